"""PostgreSQL's connection pool (``cmbagent_site.postgresql``): reused across requests, and healed after a restart."""
from __future__ import annotations

import time

import psycopg
import pytest
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator
from django.db import connection

from cmbagent_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


async def _healthz() -> int:
    request = HttpCommunicator(application, "GET", "/healthz", headers=[(b"host", b"localhost")])
    response = await request.get_response(timeout=10)
    await request.wait(timeout=10)  # the request's end, where Django hands its connection back
    return response["status"]


async def test_requests_on_threads_of_their_own_reuse_pooled_connections():
    """Each request runs on a new thread; without the pool each would open a PostgreSQL connection of its own."""
    pool = connection.pool
    before = pool.get_stats()
    for _ in range(8):
        assert await _healthz() == 200
    after = pool.get_stats()
    served = after.get("requests_num", 0) - before.get("requests_num", 0)
    opened = after.get("connections_num", 0) - before.get("connections_num", 0)
    assert served >= 8, (before, after)
    assert opened <= 2, f"{opened} connections opened for {served} requests"


async def test_after_a_database_restart_the_next_request_gets_a_working_connection_at_once():
    """A restart breaks every idle pooled connection; the first request after it neither fails nor waits for backoffs."""
    assert await _healthz() == 200
    pool = connection.pool
    await database_sync_to_async(pool.wait)(timeout=10)  # its idle connections are all open
    params = {k: v for k, v in connection.get_connection_params().items() if k in {"host", "port", "user", "password"}}
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [connection.settings_dict["NAME"]],
        ).fetchone()[0]
    assert killed >= 2, killed  # the pool's idle connections, as a restart leaves them
    started = time.monotonic()
    assert await _healthz() == 200
    assert time.monotonic() - started < 0.8  # psycopg-pool's own check sleeps 1 s after each broken one
    assert await _healthz() == 200
