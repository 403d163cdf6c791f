"""Django's PostgreSQL backend, whose pooled connections are checked as they are handed out.

A pool's idle connections all break together when PostgreSQL restarts. The
pool's own check finds them one at a time and sleeps a second after each one
it finds (psycopg-pool's backoff), so a request after a restart would wait a
second per broken connection, and fail once the pool's timeout is spent. Here
the first broken one makes the pool check all its idle connections at once
(``ConnectionPool.check``: the broken ones are replaced with new ones) and the
request takes a fresh connection straight away.
"""
from __future__ import annotations

import logging

import psycopg
from django.db.backends.postgresql import base

logger = logging.getLogger(__name__)


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        connection = super().get_new_connection(conn_params)
        pool = self.pool
        if pool is None:
            return connection
        try:
            connection.execute("")  # one round trip: does the server still know this connection?
        except psycopg.Error as exc:
            logger.warning("a pooled database connection was broken (%s); checking the others", exc)
            pool.putconn(connection)  # broken: the pool closes it and opens another
            pool.check()
            connection = super().get_new_connection(conn_params)
        return connection
