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
