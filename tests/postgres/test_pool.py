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


def _small_pool(alias: str, **changes):
    """A DatabaseWrapper of this engine with a pool of one connection and a short timeout (its own alias)."""
    from cmbagent_site.postgresql.base import DatabaseWrapper

    settings_dict = {**connection.settings_dict, **changes}
    settings_dict["OPTIONS"] = {**settings_dict["OPTIONS"], "pool": {"min_size": 1, "max_size": 1, "timeout": 0.3, "reconnect_timeout": 4.0}}
    return DatabaseWrapper(settings_dict, alias=alias)


def test_while_every_connection_is_in_use_a_request_waits_its_turn_instead_of_failing(settings):
    """A burst of more requests than connections: the database is busy, not down, so a request waits past the pool's timeout."""
    import threading

    settings.DB_POOL_BUSY_TIMEOUT = 10
    holder = _small_pool("busy-pool")
    outcome: dict = {}

    def request() -> None:  # on a thread of its own, as a request is
        waiter = _small_pool("busy-pool")
        started = time.monotonic()
        try:
            waiter.ensure_connection()
            with waiter.cursor() as cursor:
                cursor.execute("SELECT 1")
                outcome["answer"] = cursor.fetchone()
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc
        finally:
            outcome["waited"] = time.monotonic() - started
            waiter.close()

    try:
        holder.ensure_connection()  # the pool's only connection, in use
        thread = threading.Thread(target=request)
        thread.start()
        thread.join(timeout=1.0)  # three of the pool's timeouts
        assert thread.is_alive() and not outcome  # still waiting, not failed
        holder.close()  # the connection is handed back
        thread.join(timeout=10)
        assert outcome.get("answer") == (1,), outcome
        assert 0.9 < outcome["waited"] < 5, outcome
    finally:
        holder.close()
        holder.close_pool()


def test_when_the_database_does_not_answer_a_request_fails_within_the_pools_timeout(settings):
    """No connection can be opened: that is not a busy database, and the request does not wait the busy timeout."""
    from django.db import OperationalError

    settings.DB_POOL_BUSY_TIMEOUT = 10
    nowhere = _small_pool("down-pool", HOST="127.0.0.1", PORT="1")  # nothing listens on port 1
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError):
            nowhere.ensure_connection()
    finally:
        nowhere.close_pool()
    assert time.monotonic() - started < 2


def test_connections_handed_back_are_no_longer_counted_as_in_use():
    """The busy wait relies on the count of connections out of the pool: each one handed back leaves it."""
    from cmbagent_site.postgresql.base import _in_use_now

    wrapper = _small_pool("counted-pool")
    try:
        for _ in range(3):
            wrapper.ensure_connection()
            assert _in_use_now(wrapper.pool) == 1
            wrapper.close()
            assert _in_use_now(wrapper.pool) == 0
    finally:
        wrapper.close_pool()


def test_a_connection_the_pool_fails_to_take_back_is_no_longer_counted_as_in_use(monkeypatch):
    """Were it still counted, every later wait would take the database for busy, not down, and never fail fast."""
    from django.db import DatabaseError

    from cmbagent_site.postgresql.base import _in_use_now

    wrapper = _small_pool("lost-pool")
    try:
        wrapper.ensure_connection()
        assert _in_use_now(wrapper.pool) == 1

        def refuse(connection):
            raise psycopg.OperationalError("the pool could not take it back")

        monkeypatch.setattr(wrapper.pool, "putconn", refuse)
        with pytest.raises(DatabaseError):
            wrapper.close()
        assert _in_use_now(wrapper.pool) == 0
        wrapper.close()  # giving it up again changes nothing
        assert _in_use_now(wrapper.pool) == 0
    finally:
        monkeypatch.undo()
        wrapper.connection = None
        wrapper.close_pool()
