"""Database calls from asyncio code outside a request: the worker's and the sockets'."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from channels.db import DatabaseSyncToAsync
from django.db import reset_queries


class ForgettingQueries(DatabaseSyncToAsync):
    """Channels' ``database_sync_to_async``, which then forgets the queries the call logged.

    With DEBUG on, Django keeps the last 9,000 queries of each connection, and a
    request forgets its own when it ends. A worker's writes and a socket's reads
    are never a request, so without this their thread's connection would hold
    9,000 queries of event rows and state saves (about 15 MiB) for as long as
    the process lives.
    """

    def thread_handler(self, loop, *args, **kwargs):
        try:
            return super().thread_handler(loop, *args, **kwargs)
        finally:
            reset_queries()


# Used as channels' is: a decorator, or a wrapper of a sync callable.
database_sync_to_async = ForgettingQueries


# The run worker's thread: its claims and writes, in order, on a connection of their own.
_worker_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-worker-db")


def worker_database_sync_to_async(func):
    """``database_sync_to_async`` for the run worker: every call on one thread of the worker's own.

    Everything else outside a request (the sockets' reads above all) shares
    asgiref's one sync thread. With the worker there too, a socket's connect
    and catch-up would wait behind the event writes of every run the worker
    executes, so a page opened while many runs are busy would show its first
    events late. On their own thread the writes stay in order, and reads go on
    beside them.
    """
    return ForgettingQueries(func, thread_sensitive=False, executor=_worker_thread)
