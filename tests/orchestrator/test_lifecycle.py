"""Runs in child processes: cancel, suspend, resume, retry, crashes, tampering and leases."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from channels.db import database_sync_to_async

from orchestrator.engine.hitl import Answer
from orchestrator.worker import RunWorker
from sessions import services
from sessions.models import Event, Run, Session, SessionState

pytestmark = pytest.mark.django_db(transaction=True)
TASK = "Plot a damped cosine"

call = database_sync_to_async


@call
def _start(user, mode="one_shot", **kwargs):
    return services.session_start(owner=user, task=TASK, mode=mode, **kwargs)


@call
def _session(pk):
    return Session.objects.get(pk=pk)


@call
def _contents(session):
    return [(e.kind, e.agent, e.content) for e in Event.objects.filter(session=session).exclude(kind="status").order_by("seq")]


@call
def _seqs(session):
    return list(Event.objects.filter(session=session).order_by("seq").values_list("seq", flat=True))


async def _wait_for(predicate, timeout=30.0, interval=0.05):
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(interval)


async def _run_to_rest(worker: RunWorker) -> None:
    await worker.claim_available()
    assert worker.active, "the worker found no run to claim"
    await asyncio.wait_for(asyncio.gather(*worker.active.values()), timeout=90)


async def _reference(user, mode="one_shot"):
    session = await _start(user, mode=mode)
    await _run_to_rest(RunWorker(worker_id="w-reference"))
    return await _contents(session)


async def _stuck_in_a_code_loop(user) -> tuple[Session, RunWorker, asyncio.Task, int]:
    """A run whose code spins forever (a person edited it in at the code guard), with the spinning pid."""
    session = await _start(user, config={"approve_code": True})
    await _run_to_rest(RunWorker(worker_id="w-guard"))
    loop = "import os, pathlib\npathlib.Path('spin.pid').write_text(str(os.getpid()))\nwhile True:\n    pass\n"
    await call(services.session_answer)(session_id=session.pk, user=user, answer=Answer("edit", edits={"code": loop}))
    worker = RunWorker(worker_id="w-spin", poll_interval=0.2)
    serving = asyncio.create_task(worker.serve())
    pid_file = services.settings.RUNS_DIR / str(session.pk) / "spin.pid"

    async def spinning():
        return pid_file.exists() and pid_file.read_text().isdigit()

    await _wait_for(spinning)
    return session, worker, serving, int(pid_file.read_text())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie has not been reaped yet, but it no longer runs.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ", 1)[1].startswith("Z")


async def test_cancel_ends_a_run_stuck_in_a_code_loop_within_two_seconds(alice):
    session, worker, serving, pid = await _stuck_in_a_code_loop(alice)
    try:
        asked = time.monotonic()
        await call(services.session_cancel)(session_id=session.pk, user=alice)

        async def cancelled():
            return (await _session(session.pk)).status == "cancelled"

        await _wait_for(cancelled, timeout=5)
        elapsed = time.monotonic() - asked
        assert elapsed < 2.0, f"cancel took {elapsed:.2f}s"
        await _wait_for(lambda: asyncio.sleep(0, _gone(pid)), timeout=2)
        run = await call(Run.objects.filter(session=session).latest)("number")
        assert run.status == "cancelled" and run.finished_at is not None and not worker.children
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_suspend_then_resume_goes_on_without_repeating(alice, monkeypatch):
    reference = await _reference(alice, mode="planning_and_control")
    monkeypatch.setenv("CMBAGENT_OFFLINE_LATENCY", "0.1")  # slow enough to be caught mid-run
    session = await _start(alice, mode="planning_and_control")
    worker = RunWorker(worker_id="w-suspend", poll_interval=0.2)
    serving = asyncio.create_task(worker.serve())
    try:
        async def some_events():
            return len(await _seqs(session)) > 8

        await _wait_for(some_events, interval=0.01)
        await call(services.session_suspend)(session_id=session.pk, user=alice)

        async def suspended():
            return (await _session(session.pk)).status == "suspended"

        await _wait_for(suspended, timeout=5)
        assert not worker.children
        with pytest.raises(services.SessionError, match="cannot be suspended"):
            await call(services.session_suspend)(session_id=session.pk, user=alice)
        await call(services.session_resume)(session_id=session.pk, user=alice)

        async def completed():
            return (await _session(session.pk)).status == "completed"

        await _wait_for(completed, timeout=60)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert await _contents(session) == reference
    seqs = await _seqs(session)
    assert seqs == list(range(1, len(seqs) + 1))


async def test_a_killed_run_process_fails_visibly_and_retry_completes_it(alice, monkeypatch):
    """The run's process dies (SIGKILL, as the OOM killer would): the run alone fails, with the cause; Retry finishes it."""
    reference = await _reference(alice, mode="planning_and_control")
    monkeypatch.setenv("CMBAGENT_OFFLINE_LATENCY", "0.2")  # a run of about 8 s: well inside it when killed
    session = await _start(alice, mode="planning_and_control")
    bystander = await _start(alice, mode="one_shot")
    run_id = await call(lambda: Run.objects.get(session=session).pk)()
    worker = RunWorker(worker_id="w-crash", poll_interval=0.2)
    serving = asyncio.create_task(worker.serve())
    try:
        await _wait_for(call(lambda: len(Event.objects.filter(session=session)) > 10 and run_id in worker.children), interval=0.01)
        os.kill(worker.children[run_id].pid, signal.SIGKILL)

        async def settled():
            return (await _session(session.pk)).status == "failed" and (await _session(bystander.pk)).status == "completed"

        await _wait_for(settled, timeout=60)
        error = await call(lambda: Event.objects.filter(session=session, kind="error").get().content)()
        assert "SIGKILL" in error and "Retry" in error
        await call(services.session_retry)(session_id=session.pk, user=alice)

        async def completed():
            return (await _session(session.pk)).status == "completed"

        await _wait_for(completed, timeout=60)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert [c for c in await _contents(session) if c[0] != "error"] == reference
    seqs = await _seqs(session)
    assert seqs == list(range(1, len(seqs) + 1))


async def test_resume_with_an_unusable_model_says_why_and_changes_nothing(alice, monkeypatch):
    session = await _start(alice)
    await call(Session.objects.filter(pk=session.pk).update)(status="failed", model_provider="openai")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    before = await _seqs(session)
    with pytest.raises(services.SessionError, match="The model cannot be used: .*OPENAI_API_KEY"):
        await call(services.session_retry)(session_id=session.pk, user=alice)
    assert await _seqs(session) == before
    assert await call(Run.objects.filter(session=session).count)() == 1


@pytest.mark.parametrize("tamper", ["state", "log"])
async def test_resume_of_tampered_state_is_refused_with_its_cause(alice, tamper):
    session = await _start(alice)
    await call(Session.objects.filter(pk=session.pk).update)(status="suspended")
    if tamper == "state":
        await call(SessionState.objects.filter(session=session).update)(engine_state=["not", "a", "checkpoint"])
        match = "saved state of this session is unreadable"
    else:
        await call(Event.objects.filter(session=session).update)(kind="no-such-kind")
        match = "event log of this session is unreadable"
    with pytest.raises(services.SessionError, match=match):
        await call(services.session_resume)(session_id=session.pk, user=alice)
    assert (await _session(session.pk)).status == "suspended"


def test_a_stale_worker_cannot_write_to_a_run_taken_over(alice):
    from orchestrator.engine.events import EngineEvent, EventKind

    session = services.session_start(owner=alice, task=TASK, mode="one_shot")
    run = services.run_claim(worker_id="host:1:old", lease_seconds=30)
    Run.objects.filter(pk=run.pk).update(lease_expires_at=services.timezone.now())
    taken = services.run_claim(worker_id="host:2:new", lease_seconds=30)
    assert taken.pk == run.pk
    with pytest.raises(services.LeaseLostError):
        services.event_append(session_id=session.pk, run_id=run.pk, event=EngineEvent(EventKind.MESSAGE, content="late"), worker_id=run.lease_owner)
    services.event_append(session_id=session.pk, run_id=run.pk, event=EngineEvent(EventKind.MESSAGE, content="ok"), worker_id=taken.lease_owner)
    assert list(Event.objects.filter(session=session, kind="message").values_list("content", flat=True)) == ["ok"]


def test_runs_of_a_dead_worker_on_this_host_are_reclaimed_at_once(alice):
    services.session_start(owner=alice, task=TASK, mode="one_shot")
    run = services.run_claim(worker_id="box:4242:abc", lease_seconds=300)
    assert services.run_claim(worker_id="box:1:def", lease_seconds=30) is None  # the lease is still valid
    assert services.run_reclaim_orphans(host="box", alive=lambda pid: pid != 4242) == 1
    again = services.run_claim(worker_id="box:1:def", lease_seconds=30)
    assert again.pk == run.pk and again.lease_owner.startswith("box:1:def#")


def test_a_stop_request_outlives_its_dead_worker(alice):
    session = services.session_start(owner=alice, task=TASK, mode="one_shot")
    run = services.run_claim(worker_id="box:4242:abc", lease_seconds=30)
    services.session_cancel(session_id=session.pk, user=alice)
    Run.objects.filter(pk=run.pk).update(lease_expires_at=services.timezone.now())
    assert services.run_claim(worker_id="box:1:def", lease_seconds=30) is None  # not run again
    run.refresh_from_db()
    session.refresh_from_db()
    assert run.status == "cancelled" and session.status == "cancelled"


def test_lifecycle_rules(alice):
    session = services.session_start(owner=alice, task=TASK, mode="one_shot")
    with pytest.raises(services.SessionError, match="Only a suspended session can be resumed; this one is queued"):
        services.session_resume(session_id=session.pk, user=alice)
    with pytest.raises(services.SessionError, match="Only a failed session can be retried"):
        services.session_retry(session_id=session.pk, user=alice)
    services.session_suspend(session_id=session.pk, user=alice)  # queued: at once, no worker needed
    session.refresh_from_db()
    assert session.status == "suspended" and Run.objects.get(session=session).status == "suspended"
    services.session_cancel(session_id=session.pk, user=alice)
    session.refresh_from_db()
    assert session.status == "cancelled"
    with pytest.raises(services.SessionError, match="cannot be cancelled"):
        services.session_cancel(session_id=session.pk, user=alice)
