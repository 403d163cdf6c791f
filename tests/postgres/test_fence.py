"""A run's write fence under PostgreSQL's concurrency."""
from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction

from orchestrator.engine.events import EngineEvent, EventKind
from sessions import services
from sessions.models import Event, Run, Session

pytestmark = pytest.mark.django_db(transaction=True)


def _waiting_for_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


def test_a_takeover_committed_while_a_write_waits_for_its_session_is_fenced(alice):
    """The fence is read after the session's lock is granted, so it sees a takeover that committed while the
    write waited for that lock (a fence read with the lock, in the same statement, would see the run as it was
    when the write began, and let a superseded execution write into the log)."""
    session = services.session_start(owner=alice, task="fenced", mode="one_shot")
    run = services.run_claim(worker_id="w1", lease_seconds=30)
    holding, commit = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def takeover() -> None:
        try:
            with transaction.atomic():
                Session.objects.select_for_update().get(pk=session.pk)
                holding.set()
                commit.wait(10)
                Run.objects.filter(pk=run.pk).update(lease_owner="w2#feedbeef")
        finally:
            connection.close()

    def write() -> None:
        try:
            services.events_append(
                session_id=session.pk, run_id=run.pk, worker_id=run.lease_owner, checkpoint={"phase": "late"},
                events=[EngineEvent(EventKind.MESSAGE, agent="engineer", content="from the superseded execution")],
            )
        except Exception as exc:  # noqa: BLE001 - what the write raised is the point
            outcome["error"] = exc
        finally:
            connection.close()

    other = threading.Thread(target=takeover)
    other.start()
    assert holding.wait(10)
    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 10
    while not _waiting_for_a_lock():
        assert time.monotonic() < deadline, "the write never waited for the session's lock"
        time.sleep(0.01)
    commit.set()
    other.join(10)
    writer.join(10)
    assert isinstance(outcome.get("error"), services.LeaseLostError), outcome
    assert not Event.objects.filter(content="from the superseded execution").exists()
    assert Session.objects.get(pk=session.pk).state.current_phase != "late"
