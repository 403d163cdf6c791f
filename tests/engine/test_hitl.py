"""Human in the loop: the engine stops at a decision, and resume(log, answer) goes on from it."""
from __future__ import annotations

import json

import pytest

from orchestrator.engine import EngineEvent, EventKind, SwarmOrchestrator
from orchestrator.engine.hitl import Answer, AnswerError, Policy
from orchestrator.engine.offline import OfflineChatCompletionClient, _text_of, plan_for

TASK = "Compute the damped oscillation of a CMB acoustic mode and plot it"


class RecordingClient(OfflineChatCompletionClient):
    """The offline model, keeping every prompt it was given."""

    prompts: dict[str, list[str]] = {}

    async def create(self, messages, **kwargs):
        self.prompts.setdefault(self.agent, []).append("\n".join(_text_of(m) for m in messages))
        return await super().create(messages, **kwargs)


def _engine(tmp_path, mode, **kwargs):
    return SwarmOrchestrator(task=kwargs.pop("task", TASK), mode=mode, work_dir=tmp_path, **kwargs)


async def _until_waiting(engine, log, answer=None):
    """Run (or resume with ``answer``) and append the events to ``log``; return the open request."""
    stream = engine.run(log) if answer is None else engine.resume(log, answer)
    async for event, checkpoint in stream:
        assert json.loads(json.dumps(checkpoint)) == checkpoint
        # The log is what a caller stores: round-trip every event through JSON.
        log.append(EngineEvent.from_dict(json.loads(json.dumps(event.to_dict()))))
    return log[-1] if engine.outcome.status == "waiting" else None


async def test_rejected_plan_feedback_reaches_the_planner_and_revises_the_plan(tmp_path):
    RecordingClient.prompts = {}
    log: list[EngineEvent] = []
    first = _engine(tmp_path, "hitl_plan", client_for=RecordingClient)
    request = await _until_waiting(first, log)

    assert first.outcome.status == "waiting" and first.outcome.reason == "plan"
    assert request.kind == EventKind.APPROVAL and request.data["request"] == "plan"
    assert request.data["options"] == ["approve", "reject", "edit"]
    assert [s["description"] for s in request.data["plan"]] == [d for _, d in plan_for(TASK)]
    # Stopped before control: no step has started and no code has run.
    assert not [e for e in log if e.kind in (EventKind.STEP, EventKind.TOOL_CALL)]
    assert [e.content for e in log if e.kind == EventKind.PHASE] == ["hitl_planning"]

    feedback = "Add a convergence test of the sampling before interpreting anything"
    # A fresh orchestrator, as after a restart: the log is all it gets.
    second = _engine(tmp_path, "hitl_plan", client_for=RecordingClient)
    request = await _until_waiting(second, log, Answer("reject", feedback=feedback, by="alice"))

    decision = next(e for e in log if e.kind == EventKind.DECISION)
    assert decision.data["decision"] == "reject" and decision.data["by"] == "alice"
    assert decision.data["target"] == "planner"
    assert feedback in RecordingClient.prompts["planner"][-1]
    assert feedback not in RecordingClient.prompts["planner"][0]
    plans = [e for e in log if e.kind == EventKind.PLAN]
    assert len(plans) == 2
    revised = [s["description"] for s in plans[-1].data["steps"]]
    assert len(revised) == 4 and feedback in revised[2]
    # The revised plan goes through review and back to the person.
    assert request.data["request"] == "plan" and len(request.data["plan"]) == 4

    third = _engine(tmp_path, "hitl_plan", client_for=RecordingClient)
    assert await _until_waiting(third, log, Answer("approve")) is None
    assert third.outcome.status == "completed"
    assert [e.data["step"] for e in log if e.kind == EventKind.STEP] == [1, 2, 3, 4]
    # Everyone after the decision was prompted with it.
    assert feedback in RecordingClient.prompts["control"][-1]


async def test_edited_plan_is_the_plan_the_team_follows(tmp_path):
    log: list[EngineEvent] = []
    await _until_waiting(_engine(tmp_path, "hitl_plan"), log)
    steps = [
        {"agent": "engineer", "description": "Tabulate and plot the mode"},
        {"agent": "researcher", "description": "Say what the plot shows"},
    ]
    engine = _engine(tmp_path, "hitl_plan")
    assert await _until_waiting(engine, log, Answer("edit", edits={"steps": steps})) is None

    assert engine.outcome.status == "completed"
    edited = [e for e in log if e.kind == EventKind.PLAN][-1]
    assert edited.agent == "human" and [s["description"] for s in edited.data["steps"]] == [s["description"] for s in steps]
    announced = [e.content for e in log if e.kind == EventKind.STEP]
    assert len(announced) == 2 and "Tabulate and plot the mode" in announced[0]


async def test_skip_a_step_at_a_checkpoint(tmp_path):
    log: list[EngineEvent] = []
    request = await _until_waiting(_engine(tmp_path, "hitl_steps"), log)
    # No plan approval in this variant: the first stop is after step 1.
    assert request.data["request"] == "step" and request.data["step"] == 1 and request.data["of"] == 3
    assert "skip" in request.data["options"]

    request = await _until_waiting(_engine(tmp_path, "hitl_steps"), log, Answer("skip"))
    # Step 2 (the engineer's code) never ran: the next checkpoint is after step 3.
    assert request.data["step"] == 3 and "skip" not in request.data["options"]
    assert not [e for e in log if e.kind == EventKind.TOOL_CALL]
    engine = _engine(tmp_path, "hitl_steps")
    assert await _until_waiting(engine, log, Answer("continue")) is None
    assert engine.outcome.status == "completed"
    assert [e.data["step"] for e in log if e.kind == EventKind.STEP] == [1, 3]
    assert [s["status"] for s in engine.state.plan] == ["done", "skipped", "done"]


async def test_redo_and_abort_at_checkpoints(tmp_path):
    log: list[EngineEvent] = []
    await _until_waiting(_engine(tmp_path, "hitl_both"), log)  # the plan
    await _until_waiting(_engine(tmp_path, "hitl_both"), log, Answer("approve"))  # after step 1
    request = await _until_waiting(_engine(tmp_path, "hitl_both"), log, Answer("redo", feedback="Cite the damping scale"))
    assert request.data["step"] == 1
    assert [e.data["step"] for e in log if e.kind == EventKind.STEP] == [1, 1]
    engine = _engine(tmp_path, "hitl_both")
    assert await _until_waiting(engine, log, Answer("abort", by="alice")) is None
    assert engine.outcome.status == "cancelled" and "alice" in engine.outcome.reason
    assert log[-1].kind == EventKind.DECISION and log[-1].data["decision"] == "abort"


async def test_denied_code_is_never_run(tmp_path):
    log: list[EngineEvent] = []
    policy = Policy(code=True)
    request = await _until_waiting(_engine(tmp_path, "one_shot", policy=policy), log)
    assert request.data["request"] == "code" and "plot_step1.png" in request.data["code"]
    assert not list(tmp_path.iterdir())

    engine = _engine(tmp_path, "one_shot", policy=policy)
    assert await _until_waiting(engine, log, Answer("deny", feedback="No file writes, please")) is None
    assert engine.outcome.status == "completed"
    assert not [e for e in log if e.kind in (EventKind.TOOL_CALL, EventKind.ARTIFACT)]
    assert not list(tmp_path.iterdir())
    engineer_after = [e for e in log if e.kind == EventKind.MESSAGE and e.agent == "engineer"][-1]
    assert "will not be run" in engineer_after.content


async def test_edited_code_is_the_code_that_runs(tmp_path):
    log: list[EngineEvent] = []
    policy = Policy(code=True)
    await _until_waiting(_engine(tmp_path, "one_shot", policy=policy), log)
    code = "open('edited.txt', 'w').write('by a person')\nprint('edited ran')"
    engine = _engine(tmp_path, "one_shot", policy=policy)
    assert await _until_waiting(engine, log, Answer("edit", edits={"code": code})) is None
    result = next(e for e in log if e.kind == EventKind.TOOL_RESULT)
    assert "edited ran" in result.content
    assert [e.content for e in log if e.kind == EventKind.ARTIFACT] == ["edited.txt"]


async def test_allow_for_the_session_stops_asking(tmp_path):
    log: list[EngineEvent] = []
    policy = Policy(code=True)
    await _until_waiting(_engine(tmp_path, "planning_and_control", policy=policy), log)
    engine = _engine(tmp_path, "planning_and_control", policy=policy)
    assert await _until_waiting(engine, log, Answer("allow_session")) is None
    assert engine.outcome.status == "completed"
    assert sum(1 for e in log if e.kind == EventKind.APPROVAL) == 1


async def test_error_recovery_retry_and_skip(tmp_path):
    task = "Compute the damped mode, plot it, and retry if the code fails"
    policy = Policy(errors=True)
    log: list[EngineEvent] = []
    request = await _until_waiting(_engine(tmp_path / "a", "one_shot", task=task, policy=policy), log)
    assert request.data["request"] == "error" and "NameError" in request.data["error"]
    engine = _engine(tmp_path / "a", "one_shot", task=task, policy=policy)
    assert await _until_waiting(engine, log, Answer("retry", feedback="Define peak_of first")) is None
    results = [e.content for e in log if e.kind == EventKind.TOOL_RESULT]
    assert "execution failed" in results[0] and "execution succeeded" in results[1]

    log = []
    await _until_waiting(_engine(tmp_path / "b", "planning_and_control", task=task, policy=policy), log)
    engine = _engine(tmp_path / "b", "planning_and_control", task=task, policy=policy)
    assert await _until_waiting(engine, log, Answer("skip")) is None
    # The failed step was left; control went on to step 3.
    assert engine.outcome.status == "completed"
    assert [e.data["step"] for e in log if e.kind == EventKind.STEP] == [1, 2, 3]
    assert sum(1 for e in log if e.kind == EventKind.TOOL_RESULT) == 1


async def test_copilot_turn_takes_the_next_request(tmp_path):
    policy = Policy(copilot_turn=True)
    log: list[EngineEvent] = []
    request = await _until_waiting(_engine(tmp_path, "copilot", task="Plot a damped cosine", policy=policy), log)
    assert request.data["request"] == "copilot_turn"
    engine = _engine(tmp_path, "copilot", task="Plot a damped cosine", policy=policy)
    follow_up = "Now make a plan and then run the analysis of the residuals"
    request = await _until_waiting(engine, log, Answer("reply", feedback=follow_up))
    assert request.data["request"] == "copilot_turn"
    # The second request was routed on its own words: to planning.
    routes = [e.content for e in log if e.kind == EventKind.MESSAGE and e.agent == "copilot_control"]
    assert "one shot" in routes[0] and "planning" in routes[1]
    engine = _engine(tmp_path, "copilot", task="Plot a damped cosine", policy=policy)
    assert await _until_waiting(engine, log, Answer("finish")) is None
    assert engine.outcome.status == "completed"


async def test_waiting_log_runs_nothing_and_asks_nothing_twice(tmp_path):
    log: list[EngineEvent] = []
    await _until_waiting(_engine(tmp_path, "hitl_plan"), log)
    before = len(log)
    engine = _engine(tmp_path, "hitl_plan")
    assert await _until_waiting(engine, log) is not None
    assert len(log) == before and engine.outcome.status == "waiting"


@pytest.mark.parametrize(
    "answer, message",
    [
        (Answer("maybe"), "not an answer"),
        (Answer("reject"), "needs feedback"),
        (Answer("edit", edits={"steps": []}), "at least one step"),
        (Answer("edit", edits={"steps": [{"agent": "engineer", "description": "  "}]}), "empty"),
        (Answer("edit", edits={"steps": [{"agent": "nobody", "description": "do magic"}]}), "Step 1 of the edited plan is for 'nobody'"),
        (Answer("approve", feedback="x" * 5000), "limited"),
    ],
)
async def test_answers_that_do_not_fit_are_refused(tmp_path, answer, message):
    log: list[EngineEvent] = []
    await _until_waiting(_engine(tmp_path, "hitl_plan"), log)
    before = list(log)
    with pytest.raises(AnswerError, match=message):
        await _until_waiting(_engine(tmp_path, "hitl_plan"), log, answer)
    assert log == before


async def test_answer_without_a_request_is_refused(tmp_path):
    log: list[EngineEvent] = []
    await _until_waiting(_engine(tmp_path, "one_shot"), log)
    with pytest.raises(AnswerError, match="Nothing"):
        await _until_waiting(_engine(tmp_path, "one_shot"), log, Answer("approve"))


async def test_hitl_run_with_default_answers_matches_the_plain_run(tmp_path):
    """Approving everything gives the plain planning run's conversation, plus the requests and decisions."""
    plain: list[EngineEvent] = []
    await _until_waiting(_engine(tmp_path / "plain", "planning_and_control"), plain)
    log: list[EngineEvent] = []
    request = await _until_waiting(_engine(tmp_path / "hitl", "hitl_both"), log)
    while request is not None:
        request = await _until_waiting(_engine(tmp_path / "hitl", "hitl_both"), log, Answer(request.data["options"][0]))
    said = [(e.agent, e.content) for e in log if e.kind == EventKind.MESSAGE]
    assert said == [(e.agent, e.content) for e in plain if e.kind == EventKind.MESSAGE]
    assert sum(1 for e in log if e.kind == EventKind.APPROVAL) == 4  # the plan, then after each of 3 steps
