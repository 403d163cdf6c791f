"""The worker end to end on the offline model: claim, run, persist, announce."""
from __future__ import annotations

import asyncio
import math
import re

import pytest
from channels.db import database_sync_to_async
from tests.communicator import WebsocketCommunicator
from django.test import Client

from cmbagent_site.asgi import application
from orchestrator.engine.hitl import Answer
from orchestrator.worker import RunWorker
from sessions import services
from sessions.models import Event, Run, Session, SessionState

pytestmark = pytest.mark.django_db(transaction=True)
SEQ = re.compile(r'data-seq="(\d+)"')
# queued + running + the 35 engine events of the offline planning_and_control run + completed
PLANNING_EVENTS = 38


@database_sync_to_async
def _start(user, mode="planning_and_control", task="Compute the damped oscillation of a CMB acoustic mode and plot it"):
    return services.session_start(owner=user, task=task, mode=mode)


@database_sync_to_async
def _log(session):
    return list(Event.objects.filter(session=session).order_by("seq").values_list("seq", "kind", "agent"))


@database_sync_to_async
def _reload(session):
    return Session.objects.get(pk=session.pk), Run.objects.filter(session=session).latest("number"), SessionState.objects.get(pk=session.pk)


async def _owner_socket(session, user) -> WebsocketCommunicator:
    client = Client()
    await database_sync_to_async(client.force_login)(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    return WebsocketCommunicator(
        application, f"/ws/sessions/{session.pk}/", headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)]
    )


async def _run_once(worker: RunWorker) -> None:
    await worker.claim_available()
    assert worker.active, "the worker found no run to claim"
    await asyncio.wait_for(asyncio.gather(*worker.active.values()), timeout=60)


async def test_run_persists_every_event_and_completes(alice):
    """A planning_and_control run writes seq 1..N with no gap and ends completed, state saved."""
    session = await _start(alice)
    await _run_once(RunWorker(worker_id="w-test"))

    log = await _log(session)
    assert [seq for seq, _, _ in log] == list(range(1, PLANNING_EVENTS + 1))
    kinds = [kind for _, kind, _ in log]
    assert kinds[:3] == ["status", "status", "task"] and kinds[-1] == "status"
    assert {"plan", "step", "handoff", "tool_call", "tool_result", "artifact", "phase"} <= set(kinds)
    session, run, state = await _reload(session)
    assert (session.status, run.status, run.lease_owner) == ("completed", "completed", "")
    assert session.last_seq == PLANNING_EVENTS and session.total_tokens > 0
    # One checkpoint per write: each carries every event the run produced while the last one committed.
    assert 1 <= state.version <= PLANNING_EVENTS - 3
    assert state.current_phase == "summary" and len(state.plan) == 3
    assert 0 < len(state.conversation_history) <= services.HISTORY_TAIL


async def test_owner_socket_sees_every_event_once_in_order(alice):
    """While the worker runs, the owner's socket receives each seq exactly once, in order."""
    session = await _start(alice)
    ws = await _owner_socket(session, alice)
    assert (await ws.connect())[0]
    await ws.send_json_to({"type": "hello", "after": 0})
    worker = RunWorker(worker_id="w-live")
    await worker.claim_available()
    seen: list[int] = []
    async with asyncio.timeout(60):
        while not seen or seen[-1] < PLANNING_EVENTS:
            seen.extend(int(s) for s in SEQ.findall(await ws.receive_from(timeout=30)))
    await asyncio.gather(*worker.active.values())
    assert seen == list(range(1, PLANNING_EVENTS + 1))
    assert await ws.receive_nothing(timeout=0.3)
    await ws.disconnect()


async def test_closing_the_socket_does_not_stop_the_run(alice):
    """The socket never owns the run: it completes after the only viewer leaves."""
    session = await _start(alice)
    ws = await _owner_socket(session, alice)
    await ws.connect()
    await ws.send_json_to({"type": "hello", "after": 0})
    worker = RunWorker(worker_id="w-close")
    await worker.claim_available()
    await ws.receive_from(timeout=10)
    await ws.disconnect()
    await asyncio.wait_for(asyncio.gather(*worker.active.values()), timeout=60)
    session, run, _ = await _reload(session)
    assert (session.status, run.status) == ("completed", "completed")


async def test_model_failure_fails_the_run_with_its_cause(alice, monkeypatch):
    """A model endpoint answering 500 mid-run ends the run as failed, with an error event naming the cause."""
    from tests.engine.fake_openai import FakeOpenAI

    with FakeOpenAI([{"status": 500}]) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        monkeypatch.setenv("CMBAGENT_MODEL", "fake-model")
        session = await database_sync_to_async(services.session_start)(
            owner=alice, task="Plot a damped cosine", mode="one_shot", model_provider="openai"
        )
        await _run_once(RunWorker(worker_id="w-broken"))
    session, run, _ = await _reload(session)
    assert (session.status, run.status) == ("failed", "failed")
    assert "500" in run.error and fake.requests
    kinds = [kind for _, kind, _ in await _log(session)]
    assert "error" in kinds and kinds[-1] == "status"


async def test_serving_worker_wakes_on_new_session(alice):
    """A serving worker picks up a new session as soon as it is started (woken through the channel layer)."""
    worker = RunWorker(worker_id="w-serve", poll_interval=30)  # polling alone would be far too slow
    serving = asyncio.create_task(worker.serve())
    try:
        await asyncio.sleep(0.1)  # let it reach its wait on the channel
        session = await _start(alice, mode="one_shot")
        async with asyncio.timeout(30):
            while True:
                session_now, _, _ = await _reload(session)
                if session_now.status == "completed":
                    break
                await asyncio.sleep(0.05)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert session_now.last_seq > 10


async def test_bad_model_settings_fail_the_run_before_it_starts(alice, monkeypatch):
    """An OpenAI provider without key or endpoint fails at once, with the fix named in an error event."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    session = await database_sync_to_async(services.session_start)(
        owner=alice, task="t", mode="one_shot", model_provider="openai"
    )
    await _run_once(RunWorker(worker_id="w-nokey"))
    session, run, _ = await _reload(session)
    assert (session.status, run.status) == ("failed", "failed")
    assert "set OPENAI_API_KEY" in run.error
    assert [kind for _, kind, _ in await _log(session)] == ["status", "status", "error", "status"]


async def test_paused_session_continues_to_the_uninterrupted_transcript(alice):
    """A round budget pauses the run; Continue runs again from the log, and the end equals an unbudgeted run."""
    budgeted = await database_sync_to_async(services.session_start)(
        owner=alice, task="Plot a damped cosine", mode="planning_and_control", config={"max_turns": 4}
    )
    reference = await database_sync_to_async(services.session_start)(
        owner=alice, task="Plot a damped cosine", mode="planning_and_control"
    )
    worker = RunWorker(worker_id="w-budget", max_runs=1)
    await _run_once(worker)  # the budgeted session was queued first
    await _run_once(worker)
    continues = 0
    while (await _reload(budgeted))[0].status == "paused":
        await database_sync_to_async(services.session_continue)(session_id=budgeted.pk, user=alice)
        await _run_once(worker)
        continues += 1
        assert continues < 20
    assert continues >= 3

    @database_sync_to_async
    def contents(session):
        # The team's conversation: not the worker's status notes, nor the person's round-budget questions and answers.
        return [
            (e.kind, e.agent, e.content)
            for e in Event.objects.filter(session=session).exclude(kind="status").order_by("seq")
            if e.data.get("request") != "budget"
        ]

    @database_sync_to_async
    def budget_requests(session):
        from approvals.models import ApprovalRequest

        return list(ApprovalRequest.objects.filter(session=session).values_list("kind", "status", "decision", "door", "decided_by__username"))

    session, run, _ = await _reload(budgeted)
    assert session.status == "completed" and run.number == continues + 1
    assert await contents(budgeted) == await contents(reference)
    # Each spent budget was an approval request, answered by Continue through the approval service.
    assert await budget_requests(budgeted) == [("budget", "decided", "continue", "session_page", "alice")] * continues
    seqs = [seq for seq, _, _ in await _log(budgeted)]
    assert seqs == list(range(1, len(seqs) + 1))


@database_sync_to_async
def _budget_request(session):
    from approvals.models import ApprovalRequest

    return ApprovalRequest.objects.get(session=session, kind="budget", status="pending")


async def test_staff_continue_a_spent_budget_from_the_queue_and_stop_the_next(alice, approver):
    """The round budget is an approval request: staff continue it from the queue; Stop ends the run as cancelled."""
    from approvals import services as approvals

    session = await database_sync_to_async(services.session_start)(
        owner=alice, task="Plot a damped cosine", mode="planning_and_control", config={"max_turns": 4}
    )
    worker = RunWorker(worker_id="w-budget", max_runs=1)
    await _run_once(worker)
    request = await _budget_request(session)
    assert request.options == ["continue", "stop"] and request.payload["max_turns"] == 4
    assert (await _reload(session))[0].status == "paused"
    await database_sync_to_async(approvals.decide)(request.pk, user=approver, decision="continue", door="staff_queue")
    with pytest.raises(approvals.AlreadyDecided, match="Already decided: continue by carol via the staff queue"):
        await database_sync_to_async(approvals.decide)(request.pk, user=alice, decision="stop")
    await _run_once(worker)
    assert (await _reload(session))[0].status == "paused"  # the fresh budget of 4 turns was spent too

    second = await _budget_request(session)
    assert second.pk != request.pk and second.payload["continuations"] == 2
    await database_sync_to_async(services.session_answer)(session_id=session.pk, user=alice, answer=Answer("stop"))
    await _run_once(worker)
    session, run, _ = await _reload(session)
    assert (session.status, run.status) == ("cancelled", "cancelled")
    assert (await _log_texts(session))[-1] == "The run was stopped at the round budget by alice."
    kinds = [kind for _, kind, _ in await _log(session)]
    assert kinds[-3:] == ["status", "decision", "status"]  # queued, the decision, cancelled: nothing else ran


@database_sync_to_async
def _log_texts(session):
    return list(Event.objects.filter(session=session).order_by("seq").values_list("content", flat=True))


async def test_only_a_paused_session_can_be_continued(alice):
    session = await _start(alice, mode="one_shot")
    with pytest.raises(services.SessionError, match="Only a paused session can be continued; this one is queued"):
        await database_sync_to_async(services.session_continue)(session_id=session.pk, user=alice)


async def test_waiting_run_holds_no_process_and_an_answer_resumes_it(alice):
    """A hitl run ends its run at the plan, waiting; the owner's answer queues a run that goes on from there."""
    session = await _start(alice, mode="hitl_plan")
    await _run_once(RunWorker(worker_id="w-first"))
    session, run, state = await _reload(session)
    assert session.status == "waiting_approval" and run.status == "waiting_approval"
    assert run.lease_owner == "" and state.engine_state["waiting"]["request"] == "plan"
    waiting_log = await _log(session)
    assert waiting_log[-2][1] == "approval" and waiting_log[-1][1] == "status"

    with pytest.raises(services.SessionError, match="not an answer"):
        await database_sync_to_async(services.session_answer)(
            session_id=session.pk, user=alice, answer=services.hitl.Answer("maybe")
        )
    assert await _log(session) == waiting_log  # a refused answer writes nothing
    await database_sync_to_async(services.session_answer)(
        session_id=session.pk, user=alice, answer=services.hitl.Answer("approve", feedback="Looks right")
    )
    # Another worker (as after a restart) applies the answer from the database alone.
    await _run_once(RunWorker(worker_id="w-second"))
    session, run, _ = await _reload(session)
    assert session.status == "completed" and run.answer["by"] == "alice"
    log = await _log(session)
    assert [seq for seq, _, _ in log] == list(range(1, len(log) + 1))
    decision = await database_sync_to_async(Event.objects.get)(session=session, kind="decision")
    assert decision.data["decision"] == "approve" and decision.data["feedback"] == "Looks right"
    assert sum(1 for _, kind, _ in log if kind == "plan") == 1  # nothing planned twice


async def test_abort_at_a_checkpoint_cancels_the_session(alice):
    session = await _start(alice, mode="hitl_steps")
    await _run_once(RunWorker(worker_id="w-first"))
    await database_sync_to_async(services.session_answer)(
        session_id=session.pk, user=alice, answer=services.hitl.Answer("abort")
    )
    await _run_once(RunWorker(worker_id="w-second"))
    session, run, _ = await _reload(session)
    assert session.status == "cancelled" and run.status == "cancelled" and run.finished_at is not None


async def test_with_debug_on_the_worker_does_not_keep_the_queries_it_ran(alice, settings):
    """Django logs every query while DEBUG is on and forgets them when a request ends; a worker is no request,
    so its database calls (``cmbagent_site.db``) forget theirs, or its memory grows by up to 9,000 queries of event SQL."""
    from django.db import connection

    settings.DEBUG = True
    session = await _start(alice)
    worker = RunWorker(worker_id="w-debug")
    # The run writes on the worker's database thread, the one this reads from.
    logged = database_sync_to_async(lambda: len(connection.queries_log))
    await _run_once(worker)
    kept = await logged()
    state = (await _reload(session))[2]
    assert state.version >= 3, "the run wrote too few times to tell"
    # Each of the run's writes logged 7 queries or more; none is kept.
    assert kept == 0, kept


class _ScriptedChild:
    """A run's process that writes ``lines``: the first when its worker starts reading, each next one ``gap``
    seconds later."""

    def __init__(self, lines: list[dict], gap: float) -> None:
        self.lines, self.gap, self.returncode, self.pid = lines, gap, None, 0
        self.start = math.inf
        self.given = 0

    released: int | None = None  # if set, exactly this many lines are due, whatever the time

    def _due(self) -> int:
        if self.released is not None:
            return self.released
        return min(len(self.lines), 1 + int(max(0.0, asyncio.get_running_loop().time() - self.start) / self.gap))

    async def messages(self):
        self.start = asyncio.get_running_loop().time()
        while self.given < len(self.lines):
            while self._due() <= self.given:
                await asyncio.sleep(self.gap / 4)
            self.given += 1
            yield self.lines[self.given - 1]

    def ready(self, limit: int) -> list[dict]:
        found = self.lines[self.given : min(self._due(), self.given + limit)]
        self.given += len(found)
        return found

    async def wait(self) -> int:
        self.returncode = 0
        return 0

    def kill(self) -> None:
        pass


def _lines(*kinds: str) -> list[dict]:
    from orchestrator.engine.events import EngineEvent

    out = [{"type": "event", "event": EngineEvent(kind, agent="idea_maker", content=kind).to_dict(), "checkpoint": {}} for kind in kinds]
    return out + [{"type": "outcome", "status": "completed", "reason": ""}]


@pytest.mark.parametrize(("gap", "first_write"), [(0.002, ["task", "phase", "message"]), (0.2, ["task"])])
async def test_a_runs_first_write_waits_briefly_for_its_first_reply(alice, monkeypatch, gap, first_write):
    """A reply that follows the task within FIRST_WRITE_WAIT shares its write; a slower one does not hold the task back.

    (With 2 ms between lines, a busy machine may also let the next reply into the first write: the write
    holds the first reply at least.)"""
    from orchestrator import worker as worker_module
    from orchestrator.engine.process import EngineProcess

    session = await _start(alice, mode="idea_generation")
    lines = _lines("task", "phase", "message", "message")

    async def spawn(spec, *, spares=0):
        return _ScriptedChild(lines, gap)

    writes: list[list[str]] = []
    real_append = services.events_append

    def append(**kwargs):
        writes.append([str(event.kind) for event in kwargs["events"]])
        return real_append(**kwargs)

    monkeypatch.setattr(EngineProcess, "spawn", spawn)
    monkeypatch.setattr(worker_module.services, "events_append", append)
    await _run_once(RunWorker(worker_id="w-first-write"))
    assert writes[0][: len(first_write)] == first_write
    if gap > worker_module.FIRST_WRITE_WAIT:
        assert writes[0] == first_write
    assert sum(writes, []) == ["task", "phase", "message", "message"]
    assert [kind for _, kind, _ in await _log(session)][2:-1] == ["task", "phase", "message", "message"]


async def test_a_runs_first_reply_is_announced_before_its_next_write(alice, monkeypatch):
    """The write holding a run's first reply is announced before the run's next write starts: a page waits for
    that reply, and the next write would hold the database thread (and the GIL) while the announcement waits.
    Later writes do not wait for theirs (below)."""
    from orchestrator.engine.process import EngineProcess

    await _start(alice, mode="idea_generation")
    # The run's first reply at once, and all the rest as soon as its first write starts: the lines of the next
    # write are waiting when the first returns, as they are for a fast model.
    child = _ScriptedChild(_lines("task", "phase", "message", *["message"] * 30), 1.0)
    child.released = 3
    order: list[tuple[str, int, int]] = []
    real_append, real_send = services.events_append, services.send_announcements

    async def spawn(spec, *, spares=0):
        return child

    def append(**kwargs):
        child.released = len(child.lines)
        order.append(("writing", 0, 0))
        rows = real_append(**kwargs)
        order.append(("written", rows[0].seq, rows[-1].seq))
        return rows

    async def send(notes):
        await real_send(notes)
        order.extend(("sent", n["first"], n["seq"]) for _, _, n in notes if n["type"] == "session.event")

    monkeypatch.setattr(EngineProcess, "spawn", spawn)
    monkeypatch.setattr(services, "events_append", append)
    monkeypatch.setattr(services, "send_announcements", send)
    await _run_once(RunWorker(worker_id="w-first-sent"))
    writes = [entry for entry in order if entry[0] == "written"]
    assert len(writes) >= 2, order  # the run took more than one write
    first = writes[0]
    after = order[order.index(first) + 1 :]
    assert ("sent", first[1], first[2]) in after[: after.index(("writing", 0, 0))], order


async def test_a_runs_writes_do_not_wait_for_their_announcements(alice, monkeypatch):
    """Each write returns once committed: the run is written to its end while no announcement has gone out, and
    once they can, they go out in the order of the writes, every seq once."""
    session = await _start(alice, mode="one_shot")
    release = asyncio.Event()
    sent: list[dict] = []
    real_send = services.send_announcements

    async def held_back(notes):
        await release.wait()
        sent.extend(message for _, _, message in notes)
        await real_send(notes)

    monkeypatch.setattr(services, "send_announcements", held_back)
    worker = RunWorker(worker_id="w-held")
    await worker.claim_available()
    async with asyncio.timeout(60):
        while (await _reload(session))[0].status != "completed":
            await asyncio.sleep(0.05)
    assert sent == [] and worker.active  # all written, the end included; the run still waits to announce
    release.set()
    await asyncio.wait_for(asyncio.gather(*worker.active.values()), timeout=30)
    announced = [seq for note in sent if note["type"] == "session.event" for seq in range(note["first"], note["seq"] + 1)]
    last_seq = (await _reload(session))[0].last_seq
    assert announced == list(range(2, last_seq + 1))  # seq 1 (queued) is read by the page, never pushed
    statuses = [note["status"] for note in sent if note["type"] == "session.status"]
    assert statuses == ["running", "completed"]


async def test_an_announcer_keeps_the_order_of_its_writes_when_one_is_slow_to_make(monkeypatch):
    """A note whose fragment takes long to make still goes out before the notes of later writes."""
    import threading

    from orchestrator.worker import Announcer

    sent: list[str] = []

    class Layer:
        async def group_send(self, group, message):
            sent.append(message["name"])

    monkeypatch.setattr(services, "get_channel_layer", lambda: Layer())
    made = threading.Event()

    def slow() -> dict:
        made.wait(timeout=10)
        return {"type": "session.event", "name": "first"}

    announcer = Announcer()
    announcer.send([("group", "g", slow)])
    announcer.send([("group", "g", {"type": "session.event", "name": "second"}), ("group", "g", {"type": "x", "name": "third"})])
    await asyncio.sleep(0.05)
    assert sent == []  # the second write's notes wait for the first's
    made.set()
    await asyncio.wait_for(announcer.drain(), timeout=10)
    assert sent == ["first", "second", "third"]


async def test_an_announcement_that_cannot_be_made_is_logged_and_the_next_ones_still_go_out(monkeypatch, caplog):
    """Making a note may fail (the database gone for a moment): the rows are written, so the failure is logged
    and the run's later notes are sent all the same."""
    from orchestrator.worker import Announcer

    sent: list[str] = []

    class Layer:
        async def group_send(self, group, message):
            sent.append(message["name"])

    monkeypatch.setattr(services, "get_channel_layer", lambda: Layer())

    def unmakeable() -> dict:
        raise RuntimeError("the database went away")

    announcer = Announcer()
    announcer.send([("group", "g", unmakeable)])
    announcer.send([("group", "g", {"type": "session.event", "name": "later"})])
    await asyncio.wait_for(announcer.drain(), timeout=10)
    assert sent == ["later"]
    assert "could not announce a run's events" in caplog.text and "the database went away" in caplog.text
