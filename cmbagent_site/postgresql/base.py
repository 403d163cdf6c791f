"""Django's PostgreSQL backend, with a pool that heals after a restart and waits out a burst.

* **After a restart.** A pool's idle connections all break together when
  PostgreSQL restarts. The pool's own check finds them one at a time and
  sleeps a second after each one it finds (psycopg-pool's backoff), so a
  request after a restart would wait a second per broken connection, and fail
  once the pool's timeout is spent. Here the first broken one makes the pool
  check all its idle connections at once (``ConnectionPool.check``: the broken
  ones are replaced with new ones) and the request takes a fresh connection
  straight away.
* **In a burst.** The pool's timeout (``DB_POOL_TIMEOUT``) is short, so that a
  request fails fast when the database is down. When connections are in use
  and none failed to open meanwhile, the database is up and only busy: more
  requests than connections (or than the pool could open in time on a busy
  machine), such as fifty people pressing Start at once. A request then goes
  on waiting for its turn, up to ``DB_POOL_BUSY_TIMEOUT`` seconds in all,
  rather than failing.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref

import psycopg
from django.conf import settings
from django.db.backends.postgresql import base
from psycopg_pool import PoolTimeout

logger = logging.getLogger(__name__)


# The connections each pool has handed out that are still held (its own figures count connections
# still being opened, which never come while the database is down). A set, not a count: giving a
# connection up twice, or failing to hand it back, cannot leave a connection counted for ever.
_in_use: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> WeakSet of connections
_in_use_lock = threading.Lock()


def _hand_out(pool, connection) -> None:
    with _in_use_lock:
        _in_use.setdefault(pool, weakref.WeakSet()).add(connection)


def _give_up(pool, connection) -> None:
    with _in_use_lock:
        _in_use.get(pool, set()).discard(connection)


def _in_use_now(pool) -> int:
    with _in_use_lock:
        return len(_in_use.get(pool, ()))


def _connect_errors(pool) -> int:
    return pool.get_stats().get("connections_errors", 0)


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        pool = self.pool
        if pool is None:
            return super().get_new_connection(conn_params)
        connection = self._wait_for_a_turn(conn_params, pool)
        try:
            connection.execute("")  # one round trip: does the server still know this connection?
        except psycopg.Error as exc:
            logger.warning("a pooled database connection was broken (%s); checking the others", exc)
            pool.putconn(connection)  # broken: the pool closes it and opens another
            pool.check()
            connection = super().get_new_connection(conn_params)
        _hand_out(pool, connection)
        return connection

    def _close(self):
        pool = self.pool if self.connection is not None else None
        if pool is not None:
            _give_up(pool, self.connection)  # handed back, or lost if that fails: no longer held here
        super()._close()

    def _wait_for_a_turn(self, conn_params, pool):
        """A connection from the pool. After each of the pool's timeouts, wait on while the database is busy
        rather than down: connections it handed out are in use (they answered when handed out), and no attempt
        to open one has failed since the wait began. Else, or once DB_POOL_BUSY_TIMEOUT is spent, fail."""
        deadline = time.monotonic() + float(getattr(settings, "DB_POOL_BUSY_TIMEOUT", 0))
        errors = _connect_errors(pool)
        while True:
            try:
                return super().get_new_connection(conn_params)
            except PoolTimeout:
                busy = _in_use_now(pool) > 0 and _connect_errors(pool) == errors
                if not busy or time.monotonic() >= deadline:
                    raise
                logger.info("every pooled database connection is in use (%d); waiting for one", _in_use_now(pool))
