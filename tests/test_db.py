"""cmbagent_site.db: database calls outside a request forget the queries they logged."""
from __future__ import annotations

import pytest
from channels.db import database_sync_to_async as channels_database_sync_to_async
from django.contrib.auth.models import User
from django.db import connection

from cmbagent_site.db import database_sync_to_async

pytestmark = pytest.mark.django_db(transaction=True)


def _read_users() -> int:
    return len(list(User.objects.all())) + len(list(User.objects.filter(is_staff=True)))


def _logged() -> int:
    return len(connection.queries_log)


@pytest.mark.parametrize(("wrapper", "kept"), [(channels_database_sync_to_async, 2), (database_sync_to_async, 0)])
async def test_with_debug_on_a_call_outside_a_request_keeps_none_of_its_queries(settings, wrapper, kept):
    """Channels' wrapper leaves the queries in the thread's connection (the control); the project's forgets them."""
    settings.DEBUG = True
    await channels_database_sync_to_async(connection.queries_log.clear)()
    await wrapper(_read_users)()
    assert await channels_database_sync_to_async(_logged)() == kept


def test_postgresql_goes_through_a_pool_that_fails_fast(monkeypatch):
    """A PostgreSQL URL gets a connection pool whose wait is bounded (DB_POOL=0 turns it off); SQLite keeps its connection."""
    from cmbagent_site.settings import _database

    monkeypatch.delenv("DB_POOL", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgres://app@db.internal:5432/cmbagent?sslmode=require")
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "7")
    db = _database()
    assert db["CONN_MAX_AGE"] == 0  # Django's pool needs it: a request hands its connection back when it ends
    assert db["OPTIONS"]["sslmode"] == "require"  # the URL's own options are kept
    assert db["OPTIONS"]["pool"]["max_size"] == 7
    assert 0 < db["OPTIONS"]["pool"]["timeout"] <= 2  # an outage answers within /healthz's budget
    monkeypatch.setenv("DB_POOL", "0")
    assert "pool" not in _database().get("OPTIONS", {})
    monkeypatch.delenv("DATABASE_URL")
    assert "pool" not in _database().get("OPTIONS", {})


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the pool is PostgreSQL's: the PostgreSQL tier runs this")
async def test_requests_on_threads_of_their_own_reuse_pooled_connections():
    """Each request runs on a new thread; without the pool each would open a PostgreSQL connection of its own."""
    from channels.testing import HttpCommunicator

    from cmbagent_site.asgi import application

    pool = connection.pool
    before = pool.get_stats()
    for _ in range(8):
        request = HttpCommunicator(application, "GET", "/healthz", headers=[(b"host", b"localhost")])
        response = await request.get_response()
        assert response["status"] == 200, response
        await request.wait(timeout=5)  # the request's end, where Django hands its connection back
    after = pool.get_stats()
    served = after.get("requests_num", 0) - before.get("requests_num", 0)
    opened = after.get("connections_num", 0) - before.get("connections_num", 0)
    assert served >= 8, (before, after)
    assert opened <= 2, f"{opened} connections opened for {served} requests"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the pool is PostgreSQL's: the PostgreSQL tier runs this")
async def test_after_a_database_restart_the_next_request_gets_a_working_connection_at_once():
    """A restart breaks every idle pooled connection; the first request after it neither fails nor waits for backoffs."""
    import time

    import psycopg
    from channels.testing import HttpCommunicator

    from cmbagent_site.asgi import application

    async def healthz() -> int:
        request = HttpCommunicator(application, "GET", "/healthz", headers=[(b"host", b"localhost")])
        response = await request.get_response(timeout=10)
        await request.wait(timeout=10)
        return response["status"]

    assert await healthz() == 200
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
    assert await healthz() == 200
    assert time.monotonic() - started < 0.8  # psycopg-pool's own check sleeps 1 s after each broken one
    assert await healthz() == 200
