"""Pausing at the round budget and continuing from the event log alone."""
from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orchestrator.engine import EngineEvent, EventKind, SwarmOrchestrator
from orchestrator.engine.hitl import Answer, is_budget, open_request
from orchestrator.engine.swarm import split_history

TASK = "Compute the damped oscillation of a CMB acoustic mode and plot it"


def transcript(events):
    """What a reader sees: everything but token counts, which depend on prompt length."""
    return [(str(e.kind), e.agent, e.content, json.dumps(e.data, sort_keys=True)) for e in events]


async def _collect(engine, history=()):
    """Run ``engine`` from ``history``; a spent round budget waiting there is continued, as Continue does."""
    request = open_request(history)
    if request is not None and is_budget(request):
        return [event async for event, _ in engine.resume(history, Answer("continue"))]
    return [event async for event, _ in engine.run(history)]


def team(events):
    """The team's conversation: without the worker's status notes and the round-budget requests and decisions."""
    return [e for e in events if e.kind != EventKind.STATUS and not is_budget(e)]


async def _uninterrupted(tmp_path, mode="planning_and_control"):
    return await _collect(SwarmOrchestrator(task=TASK, mode=mode, work_dir=tmp_path / "whole"))


async def test_pause_and_continue_gives_the_uninterrupted_transcript(tmp_path):
    """max_rounds=3: the run pauses, each continue has a fresh budget, the end result is identical."""
    whole = await _uninterrupted(tmp_path)
    log: list[EngineEvent] = []
    pauses = 0
    engine = SwarmOrchestrator(task=TASK, mode="planning_and_control", work_dir=tmp_path / "paused", max_turns=3)
    while True:
        log.extend(await _collect(engine, log))
        if engine.outcome.status != "paused":
            break
        assert engine.outcome.reason == "max_rounds_reached"
        pauses += 1
        log.append(EngineEvent(EventKind.STATUS, data={"status": "paused"}))  # as the worker records it
        assert pauses < 50
    assert engine.outcome.status == "completed"
    # One pause per full budget of 3 turns; a turn is each model reply (a text, or a thought with its call).
    turns = sum(1 for e in whole if e.kind in (EventKind.HANDOFF, EventKind.TOOL_CALL) or e.data.get("final"))
    assert pauses == (turns - 1) // 3
    assert transcript(team(log)) == transcript(whole)
    assert engine.state.continuations == pauses
    # Each spent budget was asked once, and answered once, by a person.
    asked = [e for e in log if e.kind == EventKind.APPROVAL]
    assert len(asked) == pauses and all(e.data["request"] == "budget" and e.data["options"] == ["continue", "stop"] for e in asked)
    assert [e.data["decision"] for e in log if e.kind == EventKind.DECISION] == ["continue"] * pauses
    assert all(step["status"] == "done" for step in engine.state.plan)


async def test_continuing_from_a_fresh_orchestrator(tmp_path):
    """A new orchestrator object (as in a new process) continues from the log with nothing else."""
    first = SwarmOrchestrator(task=TASK, mode="one_shot", work_dir=tmp_path / "run", max_turns=2)
    log = await _collect(first)
    assert first.outcome.status == "paused"
    second = SwarmOrchestrator(task=TASK, mode="one_shot", work_dir=tmp_path / "run")
    stored = json.loads(json.dumps([e.to_dict() for e in log]))
    log += await _collect(second, [EngineEvent.from_dict(d) for d in stored])
    assert second.outcome.status == "completed"
    assert transcript(team(log)) == transcript(await _uninterrupted(tmp_path, "one_shot"))


def test_split_history_keeps_whole_turns():
    """The log splits after its last complete turn; an unfinished turn is the remainder."""
    events = [
        EngineEvent(EventKind.TASK, agent="user", content="t"),
        EngineEvent(EventKind.MESSAGE, agent="engineer", content="code", data={"final": False}),
        EngineEvent(EventKind.HANDOFF, agent="engineer", content="executor"),
        EngineEvent(EventKind.TOOL_CALL, agent="executor", content="execute_code"),
    ]
    done, rest = split_history(events)
    assert done == events[:3] and rest == events[3:]
    assert split_history(events[:2]) == (events[:1], events[1:2])
    result = EngineEvent(EventKind.TOOL_RESULT, agent="executor", content="exitcode: 0")
    artifact = EngineEvent(EventKind.ARTIFACT, agent="executor", content="plot.png")
    paused = EngineEvent(EventKind.STATUS, data={"status": "paused"})
    # At the end of the log a tool result may still be missing its artifacts: not complete.
    assert split_history([*events, result, artifact]) == (events[:3], [events[3], result, artifact])
    # Followed by the worker's pause, it is.
    assert split_history([*events, result, artifact, paused])[1] == [paused]
    # Not by a takeover's, a failure's or a suspension's status: the run may have died before its artifacts.
    for status in ("running", "queued", "failed", "suspended"):
        note = EngineEvent(EventKind.STATUS, content="Taken over", data={"status": status})
        assert split_history([*events, result, artifact, note]) == (events[:3], [events[3], result, artifact, note])
        assert split_history([*events, result, note, artifact, paused])[1] == [paused]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(min_value=0, max_value=45),
    mode=st.sampled_from(["planning_and_control", "one_shot", "copilot", "idea_generation"]),
    task=st.sampled_from([TASK, TASK + ", with one retry"]),
    note=st.sampled_from([None, "running", "queued", "failed", "suspended"]),
)
@example(cut=9, mode="copilot", task=TASK, note=None)  # between a tool result and its artifacts
@example(cut=10, mode="one_shot", task=TASK, note=None)
@example(cut=12, mode="one_shot", task=TASK + ", with one retry", note=None)  # after the failed attempt
@example(cut=9, mode="copilot", task=TASK, note="running")  # taken over between a tool result and its artifacts
def test_stop_anywhere_and_continue(tmp_path_factory, cut, mode, task, note):
    """Stop at any event boundary, serialise the log (with the status the worker then writes: a takeover's,
    a failure's, a suspension's), continue in a fresh orchestrator: same transcript."""

    async def scenario():
        base = tmp_path_factory.mktemp("resume")
        whole = await _collect(SwarmOrchestrator(task=task, mode=mode, work_dir=base / "whole"))
        at = min(cut, len(whole))
        notes = [EngineEvent(EventKind.STATUS, content=f"{note} at {at}", data={"status": note})] if note else []
        stored = json.loads(json.dumps([e.to_dict() for e in whole[:at] + notes]))
        engine = SwarmOrchestrator(task=task, mode=mode, work_dir=base / "cut")
        rest = await _collect(engine, [EngineEvent.from_dict(d) for d in stored])
        assert engine.outcome.status == "completed"
        assert transcript(whole[:at] + rest) == transcript(whole)

    asyncio.run(scenario())


async def test_auto_continue_goes_on_up_to_its_ceiling(tmp_path):
    """Auto-continue passes spent budgets without a person, up to the ceiling, then pauses."""
    whole = await _uninterrupted(tmp_path)
    unattended = SwarmOrchestrator(task=TASK, mode="planning_and_control", work_dir=tmp_path / "a", max_turns=3, auto_continue=100)
    events = await _collect(unattended)
    notes = [e for e in events if e.kind == EventKind.STATUS]
    assert unattended.outcome.status == "completed"
    assert transcript(team(events)) == transcript(whole)
    assert not any(e.kind == EventKind.APPROVAL for e in events)  # no person was asked
    # Each automatic continuation is in the log, numbered.
    assert [e.data["auto_continue"] for e in notes] == list(range(1, len(notes) + 1))
    assert unattended.state.continuations == len(notes) >= 3

    capped = SwarmOrchestrator(task=TASK, mode="planning_and_control", work_dir=tmp_path / "b", max_turns=3, auto_continue=2)
    first = await _collect(capped)
    assert capped.outcome.status == "paused" and capped.state.continuations == 2
    assert first[-1].kind == EventKind.APPROVAL and first[-1].data["request"] == "budget"  # only then a person is asked
    said = team(first)
    assert transcript(said) == transcript(whole[: len(said)])

    # Continued later by a fresh orchestrator (another process): the automatic ones still count.
    log = first + [EngineEvent(EventKind.STATUS, data={"status": "paused"})]
    later = SwarmOrchestrator(task=TASK, mode="planning_and_control", work_dir=tmp_path / "b", max_turns=3)
    await _collect(later, log)
    assert later.state.continuations == 3


async def _drive(work_dir, mode, log, task=TASK):
    """Run ``log`` to the end in fresh orchestrators, answering each request with feedback of its own."""
    from orchestrator.engine.hitl import Answer, open_request

    while True:
        engine = SwarmOrchestrator(task=task, mode=mode, work_dir=work_dir)
        request = open_request(log)
        if request is not None:
            decision = "reject" if request.data["request"] == "plan" and len(request.data["plan"]) == 3 else request.data["options"][0]
            stream = engine.resume(log, Answer(decision, feedback=f"note {len(log)}: add a convergence test"))
        else:
            stream = engine.run(log)
        log.extend([event async for event, _ in stream])
        if engine.outcome.status != "waiting":
            assert engine.outcome.status == "completed"
            return log


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=80), mode=st.sampled_from(["hitl_both", "hitl_steps"]))
@example(cut=17, mode="hitl_both")
def test_stop_anywhere_in_a_decided_run_and_continue(tmp_path_factory, cut, mode):
    """With requests and decisions (a rejected plan, feedback), any cut continues to the same transcript."""

    async def scenario():
        base = tmp_path_factory.mktemp("hitl")
        whole = await _drive(base / "whole", mode, [])
        assert any(e.kind == EventKind.DECISION for e in whole)
        at = min(cut, len(whole))
        stored = [EngineEvent.from_dict(d) for d in json.loads(json.dumps([e.to_dict() for e in whole[:at]]))]
        rest = await _drive(base / "cut", mode, stored)
        assert transcript(rest) == transcript(whole)

    asyncio.run(scenario())


async def test_a_spent_budget_can_be_stopped_by_a_person(tmp_path):
    """Stop, the budget request's other answer, ends the run as cancelled, with the decision in the log."""
    first = SwarmOrchestrator(task=TASK, mode="planning_and_control", work_dir=tmp_path / "run", max_turns=3)
    log = await _collect(first)
    request = open_request(log)
    assert request is not None and is_budget(request) and request.data["max_turns"] == 3
    assert request.data["turns"] == 3 and request.data["continuations"] == 1
    later = SwarmOrchestrator(task=TASK, mode="planning_and_control", work_dir=tmp_path / "run", max_turns=3)
    added = [event async for event, _ in later.resume(log, Answer("stop", by="alice"))]
    assert [e.kind for e in added] == [EventKind.DECISION]
    assert added[0].data["decision"] == "stop" and "stop" in added[0].content
    assert later.outcome.status == "cancelled" and "round budget by alice" in later.outcome.reason
    # A run asked to go on while the budget question is open does nothing and asks nothing twice.
    idle = SwarmOrchestrator(task=TASK, mode="planning_and_control", work_dir=tmp_path / "run", max_turns=3)
    assert [event async for event, _ in idle.run(log)] == []
    assert idle.outcome.status == "waiting" and idle.outcome.reason == "budget"

