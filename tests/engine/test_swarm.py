"""The engine on the offline model: events, phases, artifacts, determinism."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json

import pytest

from orchestrator.engine import EngineEvent, EventKind, SwarmOrchestrator
from orchestrator.engine.offline import plan_for

TASK = "Compute the damped oscillation of a CMB acoustic mode and plot it"


async def _run(tmp_path, mode, **kwargs):
    engine = SwarmOrchestrator(task=TASK, mode=mode, work_dir=tmp_path, **kwargs)
    pairs = [pair async for pair in engine.run()]
    return engine, [e for e, _ in pairs], [c for _, c in pairs]


async def test_planning_and_control_walks_the_plan(tmp_path):
    """Planner, reviewer, control and the step agents all speak; every step runs; the run completes."""
    engine, events, checkpoints = await _run(tmp_path, "planning_and_control")

    assert engine.outcome.status == "completed"
    speakers = {e.agent for e in events if e.kind == EventKind.MESSAGE}
    assert speakers == {"planner", "plan_reviewer", "control", "researcher", "engineer", "executor", "summarizer", "terminator"}
    phases = [e.content for e in events if e.kind == EventKind.PHASE]
    assert phases == ["planning", "control", "summary"]
    plan = next(e for e in events if e.kind == EventKind.PLAN)
    assert [s["description"] for s in plan.data["steps"]] == [d for _, d in plan_for(TASK)]
    assert [e.data["step"] for e in events if e.kind == EventKind.STEP] == [1, 2, 3]
    assert checkpoints[-1]["plan"] and all(s["status"] == "done" for s in checkpoints[-1]["plan"])
    handoffs = [(e.agent, e.content) for e in events if e.kind == EventKind.HANDOFF]
    assert handoffs[:2] == [("planner", "plan_reviewer"), ("plan_reviewer", "control")]
    assert events[0].kind == EventKind.TASK and events[0].content == TASK
    assert len(events) == 35


async def test_engineer_code_really_runs_and_writes_artifacts(tmp_path):
    """The executor runs the engineer's code in a child process; its files become artifact events."""
    _, events, _ = await _run(tmp_path, "one_shot")

    result = next(e for e in events if e.kind == EventKind.TOOL_RESULT)
    assert "execution succeeded" in result.content and "peak amplitude:" in result.content
    artifacts = {e.data["path"]: e.data for e in events if e.kind == EventKind.ARTIFACT}
    assert set(artifacts) == {"plot_step1.png", "results_step1.csv"}
    png = (tmp_path / "plot_step1.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and artifacts["plot_step1.png"]["size"] == len(png)
    assert artifacts["plot_step1.png"]["kind"] == "image"
    rows = (tmp_path / "results_step1.csv").read_text().splitlines()
    assert rows[0] == "x,y" and len(rows) == 201


async def test_same_task_gives_same_transcript(tmp_path):
    """The offline model is deterministic: two runs of one task give identical events."""
    _, first, _ = await _run(tmp_path / "a", "planning_and_control")
    _, second, _ = await _run(tmp_path / "b", "planning_and_control")
    assert [e.to_dict() for e in first] == [e.to_dict() for e in second]


async def test_events_and_checkpoints_are_json(tmp_path):
    """Every event and checkpoint survives a JSON round trip unchanged."""
    _, events, checkpoints = await _run(tmp_path, "planning_and_control")
    for event, checkpoint in zip(events, checkpoints, strict=True):
        assert EngineEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event
        assert json.loads(json.dumps(checkpoint)) == checkpoint


async def test_checkpoint_size_does_not_grow_with_history(tmp_path):
    """A checkpoint holds what the log does not: its size stays flat as the transcript grows."""
    _, _, checkpoints = await _run(tmp_path, "planning_and_control")
    sizes = [len(json.dumps(c)) for c in checkpoints[5:]]
    assert max(sizes) < 2_000
    assert max(sizes) - min(sizes) < 200


async def test_token_usage_is_reported(tmp_path):
    """Model calls report token usage, carried on the events that cost them."""
    _, events, _ = await _run(tmp_path, "planning_and_control")
    assert sum(e.prompt_tokens for e in events) > 1000
    assert all(e.completion_tokens > 0 for e in events if e.kind == EventKind.HANDOFF)


async def test_turn_budget_pauses_the_run(tmp_path):
    """When the turn budget is spent the run stops as paused, reason max_rounds_reached."""
    engine, events, _ = await _run(tmp_path, "planning_and_control", max_turns=3)
    assert engine.outcome.status == "paused"
    assert engine.outcome.reason == "max_rounds_reached"
    assert EventKind.TOOL_CALL not in {e.kind for e in events}


async def test_failing_code_is_reported_not_raised(tmp_path):
    """Code that fails gives a tool result saying so, and the team goes on."""
    engine = SwarmOrchestrator(task=TASK, mode="one_shot", work_dir=tmp_path)
    output = await engine.execute_code("raise SystemExit('boom')")
    assert "execution failed" in output and "boom" in output


async def test_code_time_limit(tmp_path):
    """An endless loop is stopped at the time limit."""
    engine = SwarmOrchestrator(task=TASK, mode="one_shot", work_dir=tmp_path, code_timeout=1.0)
    output = await engine.execute_code("while True:\n    pass\n")
    assert "time limit exceeded" in output


def test_engine_does_not_import_django():
    """orchestrator.engine is free of Django: importing it in a clean interpreter loads no django module."""
    import subprocess
    import sys

    code = "import sys, orchestrator.engine; print(any(m == 'django' or m.startswith('django.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mode", ["nope", ""])
def test_unknown_mode_is_refused(tmp_path, mode):
    """An unknown mode is a clear error before anything runs."""
    with pytest.raises(ValueError):
        SwarmOrchestrator(task=TASK, mode=mode, work_dir=tmp_path)


async def test_artifacts_follow_their_own_tool_result_when_the_consumer_is_slow(tmp_path):
    """The team runs ahead of a slow consumer; artifacts still come right after the result that made them."""
    import asyncio

    engine = SwarmOrchestrator(task=TASK, mode="planning_and_control", work_dir=tmp_path)
    events = []
    async for event, _ in engine.run():
        events.append(event)
        await asyncio.sleep(0.01)  # a consumer writing each event to a database
    kinds = [e.kind for e in events]
    first = kinds.index(EventKind.ARTIFACT)
    assert kinds[first - 1] == EventKind.TOOL_RESULT and events[first - 1].data["name"] == "execute_code"
    assert kinds[first : first + 2] == [EventKind.ARTIFACT, EventKind.ARTIFACT]
    assert kinds.count(EventKind.ARTIFACT) == 2


async def test_idea_generation_makes_critiques_and_selects(tmp_path):
    """Idea maker and critic go two rounds; the summary names the selected idea."""
    engine, events, _ = await _run(tmp_path, "idea_generation")
    assert engine.outcome.status == "completed"
    speakers = [e.agent for e in events if e.kind == EventKind.MESSAGE]
    assert speakers == ["idea_maker", "idea_hater", "idea_maker", "idea_hater", "summarizer", "terminator"]
    assert [e.content for e in events if e.kind == EventKind.PHASE] == ["idea_generation", "summary"]
    summary = next(e for e in events if e.kind == EventKind.MESSAGE and e.agent == "summarizer")
    assert "**Selected:** refined idea 1" in summary.content
    assert EventKind.TOOL_CALL not in {e.kind for e in events}


@pytest.mark.parametrize(
    ("task", "route", "phases"),
    [
        ("Make a plan to estimate the sound horizon", "planner", ["copilot", "planning", "control", "summary"]),
        ("Compute a damped cosine and then fit its decay rate", "planner", ["copilot", "planning", "control", "summary"]),
        ("Plot a damped cosine", "engineer", ["copilot", "one_shot", "summary"]),
    ],
)
async def test_copilot_routes_each_request(tmp_path, task, route, phases):
    """copilot_control sends a focused request to the engineer and a multi-part one to planning."""
    engine = SwarmOrchestrator(task=task, mode="copilot", work_dir=tmp_path)
    events = [e async for e, _ in engine.run()]
    assert engine.outcome.status == "completed"
    first_handoff = next(e for e in events if e.kind == EventKind.HANDOFF)
    assert (first_handoff.agent, first_handoff.content) == ("copilot_control", route)
    assert [e.content for e in events if e.kind == EventKind.PHASE] == phases
    assert any(e.kind == EventKind.ARTIFACT for e in events)


@pytest.mark.parametrize("mode", ["planning_and_control", "one_shot"])
async def test_a_failing_step_is_fixed_and_retried(tmp_path, mode):
    """Asked to show a retry, the engineer's first code fails; the executor hands back, the fix runs."""
    engine = SwarmOrchestrator(task="Plot a damped cosine, with one retry", mode=mode, work_dir=tmp_path)
    events = [e async for e, _ in engine.run()]
    assert engine.outcome.status == "completed"
    results = [e.content for e in events if e.kind == EventKind.TOOL_RESULT]
    assert len(results) == 2
    assert "execution failed" in results[0] and "NameError: name 'peak_of' is not defined" in results[0]
    assert "execution succeeded" in results[1]
    handoffs = [(e.agent, e.content) for e in events if e.kind == EventKind.HANDOFF]
    assert ("executor", "engineer") in handoffs
    fix = [e for e in events if e.kind == EventKind.MESSAGE and e.agent == "engineer"][1]
    assert fix.content.startswith("The previous attempt failed (NameError: name 'peak_of' is not defined)")
    assert sum(1 for e in events if e.kind == EventKind.ARTIFACT) == 4  # both attempts wrote their files


def test_phase_registry_matches_the_agents():
    """Every phase is led by a registered agent, and copilot_control is offered its phases as tools."""
    from orchestrator.engine.agents import AGENTS, build_agents
    from orchestrator.engine.modes import Mode
    from orchestrator.engine.offline import OfflineChatCompletionClient
    from orchestrator.engine.phases import PHASES

    assert {spec.tool_name for spec in PHASES.values()} >= {"invoke_planning_phase", "invoke_one_shot_phase"}
    assert all(spec.lead in AGENTS for spec in PHASES.values())
    async def execute_code(code: str) -> str:
        return code

    agents = build_agents(Mode.COPILOT.roster, client_for=OfflineChatCompletionClient, tools={"execute_code": execute_code})
    copilot_control = next(a for a in agents if a.name == "copilot_control")
    assert set(copilot_control._handoffs) == {"invoke_planning_phase", "invoke_one_shot_phase"}


async def test_copilot_invokes_phases_as_tools(tmp_path):
    """The route is a call of invoke_<phase>_phase, recorded on the handoff event."""
    engine = SwarmOrchestrator(task="Make a plan to estimate the sound horizon", mode="copilot", work_dir=tmp_path)
    events = [e async for e, _ in engine.run()]
    first = next(e for e in events if e.kind == EventKind.HANDOFF)
    assert first.data["phase"] == "planning" and first.content == "planner"
    assert EventKind.TOOL_CALL not in {e.kind for e in events[: events.index(first)]}


class _NoThreads(concurrent.futures.ThreadPoolExecutor):
    def submit(self, fn, /, *args, **kwargs):
        raise AssertionError(f"{fn!r} was sent to a thread")


async def test_handoffs_answer_on_the_loop_not_on_threads(tmp_path):
    """Every turn of a Swarm ends in a handoff; its tool answers on the event loop, with no thread hop
    (autogen's own handoff tool runs a plain function on the loop's thread pool)."""
    asyncio.get_running_loop().set_default_executor(_NoThreads())
    engine, events, _ = await _run(tmp_path, "idea_generation")
    assert engine.outcome.status == "completed"
    handoffs = [e for e in events if e.kind == EventKind.HANDOFF]
    assert len(handoffs) >= 5
    assert not [e for e in events if e.kind == EventKind.ERROR]


def test_handoff_tools_are_built_once_per_process():
    """Building a tool makes a pydantic model; a second team of the same roster reuses the first's."""
    from orchestrator.engine.agents import build_agents
    from orchestrator.engine.offline import OfflineChatCompletionClient

    def tools(agents):
        return {tool.name: tool for agent in agents for tool in agent._handoff_tools}  # noqa: SLF001

    roster = ("idea_maker", "idea_hater", "summarizer")
    first = tools(build_agents(roster, client_for=lambda name: OfflineChatCompletionClient(name), tools={}))
    second = tools(build_agents(roster, client_for=lambda name: OfflineChatCompletionClient(name), tools={}))
    assert first and first.keys() == second.keys()
    assert all(first[name] is second[name] for name in first)


class _Counted:
    """Counts the calls of one of autogen's runtime methods, on its class, and still calls it."""

    def __init__(self, monkeypatch, name):
        from autogen_core import SingleThreadedAgentRuntime

        self.calls = 0
        original = getattr(SingleThreadedAgentRuntime, name)
        counter = self

        if name == "_create_otel_attributes":
            async def counted(self, *args, **kwargs):
                counter.calls += 1
                return await original(self, *args, **kwargs)
        else:
            def counted(self, *args, **kwargs):
                counter.calls += 1
                return original(self, *args, **kwargs)

        monkeypatch.setattr(SingleThreadedAgentRuntime, name, counted)


async def _quiet_run(tmp_path, monkeypatch, *, quiet: bool = True):
    import orchestrator.engine.swarm as swarm

    if not quiet:
        monkeypatch.setattr(swarm, "quiet_team", lambda team: team)
    serialised, attributes = _Counted(monkeypatch, "_try_serialize"), _Counted(monkeypatch, "_create_otel_attributes")
    engine, events, _ = await _run(tmp_path, "idea_generation")
    assert engine.outcome.status == "completed"
    return events, serialised.calls, attributes.calls


async def test_the_runtime_skips_spans_and_event_records_nobody_reads(tmp_path, monkeypatch):
    """With no tracer and autogen's event logger off (as in a run's process), the runtime serialises no
    message for either; the transcript is the same as with all that work done."""
    quiet_events, quiet_serialised, quiet_attributes = await _quiet_run(tmp_path / "q", monkeypatch)
    loud_events, loud_serialised, loud_attributes = await _quiet_run(tmp_path / "l", monkeypatch, quiet=False)
    assert quiet_serialised == quiet_attributes == 0
    assert loud_serialised > 100 and loud_attributes > 50  # the control: autogen does it on every message
    assert [e.to_dict() for e in quiet_events] == [e.to_dict() for e in loud_events]


async def test_a_configured_tracer_or_event_logger_keeps_its_records(tmp_path, monkeypatch):
    """Whoever turns tracing or autogen's event log on still gets them."""
    import logging

    from autogen_core import EVENT_LOGGER_NAME
    from opentelemetry import trace

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.NoOpTracerProvider())
    _, serialised, attributes = await _quiet_run(tmp_path / "t", monkeypatch)
    assert serialised > 100 and attributes > 50
    monkeypatch.undo()

    event_logger = logging.getLogger(EVENT_LOGGER_NAME)
    level = event_logger.level
    event_logger.setLevel(logging.INFO)
    try:
        _, serialised, attributes = await _quiet_run(tmp_path / "e", monkeypatch)
    finally:
        event_logger.setLevel(level)
    assert serialised > 50 and attributes == 0  # the event records are made; the spans are not


def test_quieting_fails_loudly_if_autogen_moves_what_it_replaces():
    from autogen_core import SingleThreadedAgentRuntime

    from orchestrator.engine.runtime import quiet_team

    class Team:
        pass

    with pytest.raises(AttributeError, match="_runtime"):
        quiet_team(Team())
    team = Team()
    team._runtime = SingleThreadedAgentRuntime()  # noqa: SLF001
    assert quiet_team(team) is team
