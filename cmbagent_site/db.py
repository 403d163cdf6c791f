"""Database calls from asyncio code outside a request: the worker's and the sockets'."""
from __future__ import annotations

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
