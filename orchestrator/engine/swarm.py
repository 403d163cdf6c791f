"""SwarmOrchestrator: runs a mode's team on autogen's Swarm and yields events.

Every autogen message becomes one or more typed :class:`EngineEvent` objects,
each paired with a checkpoint: the small dict of what the event log itself does
not hold (phase, step, plan, counters, context variables). A checkpoint's size
does not grow with the history, so saving one after every event is O(1).
"""
from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autogen_agentchat.base import TaskResult
from autogen_agentchat.conditions import TextMentionTermination
from autogen_agentchat.messages import (
    HandoffMessage,
    TextMessage,
    ThoughtEvent,
    ToolCallExecutionEvent,
    ToolCallRequestEvent,
)
from autogen_agentchat.teams import Swarm
from autogen_core.models import ChatCompletionClient

from orchestrator.engine.agents import build_agents, role_of
from orchestrator.engine.events import EngineEvent, EventKind
from orchestrator.engine.execution import CodeRunner
from orchestrator.engine.modes import Mode
from orchestrator.engine.models import ModelConfig, client_factory
from orchestrator.engine.offline import PLAN_LINE, STEP_MARK

logger = logging.getLogger(__name__)

HANDOFF_PREFIX = "transfer_to_"


@dataclass(slots=True)
class RunOutcome:
    """How a run ended: ``completed``, ``paused`` (round budget) or ``failed``."""

    status: str
    reason: str = ""


@dataclass(slots=True)
class Checkpoint:
    phase: str = ""
    step: int = 0
    plan: list[dict[str, Any]] = field(default_factory=list)
    speaker: str = ""
    turns: int = 0
    context_variables: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": self.step,
            "plan": [dict(s) for s in self.plan],
            "speaker": self.speaker,
            "turns": self.turns,
            "context_variables": dict(self.context_variables),
        }


class SwarmOrchestrator:
    """Runs one task with one mode's team and yields ``(event, checkpoint)`` pairs.

    After :meth:`run` is exhausted, :attr:`outcome` says how it ended.
    """

    def __init__(
        self,
        *,
        task: str,
        mode: Mode | str,
        work_dir: Path,
        model: ModelConfig | None = None,
        client_for: Callable[[str], ChatCompletionClient] | None = None,
        max_turns: int | None = None,
        code_timeout: float = 30.0,
    ) -> None:
        self.task = task
        self.mode = Mode(mode)
        self.runner = CodeRunner(work_dir, timeout=code_timeout)
        self.model = model or ModelConfig()
        # Validates the model settings now: a missing key fails before anything runs.
        self.client_for = client_for or client_factory(self.model)
        self.max_turns = max_turns
        self.state = Checkpoint()
        self.outcome: RunOutcome | None = None
        # Artifacts of each execute_code call, oldest first. autogen runs the team
        # ahead of the consumer of run_stream, so artifacts are matched to their
        # own tool result, in call order, never to whatever event comes next.
        self._artifacts_by_execution: collections.deque[list[dict[str, Any]]] = collections.deque()
        self._handoff_tokens: dict[str, int] | None = None

    async def execute_code(self, code: str) -> str:
        """Run a Python code block in the run's working directory and return its output."""
        result = await self.runner.execute(code)
        self._artifacts_by_execution.append(result.artifacts)
        return result.summary()

    def _team(self) -> Swarm:
        agents = build_agents(
            self.mode.roster,
            client_for=self.client_for,
            tools={"execute_code": self.execute_code},
            stream=self.model.provider == "openai" and self.model.stream,
        )
        return Swarm(
            agents,
            termination_condition=TextMentionTermination("TERMINATE", sources=["terminator"]),
            max_turns=self.max_turns,
        )

    async def run(self) -> AsyncIterator[tuple[EngineEvent, dict[str, Any]]]:
        team = self._team()
        try:
            async for item in team.run_stream(task=self.task):
                if isinstance(item, TaskResult):
                    self.outcome = self._outcome_of(item)
                    continue
                for event in self._translate(item):
                    yield event, self.state.to_dict()
        except Exception as exc:  # noqa: BLE001 - any failure of the team ends the run visibly
            logger.exception("run failed")
            self.outcome = RunOutcome("failed", f"{type(exc).__name__}: {exc}")
            yield EngineEvent(EventKind.ERROR, content=self.outcome.reason), self.state.to_dict()

    def _outcome_of(self, result: TaskResult) -> RunOutcome:
        reason = result.stop_reason or ""
        if "TERMINATE" in reason or "Text 'TERMINATE'" in reason:
            return RunOutcome("completed", reason)
        if "Maximum number of turns" in reason:
            return RunOutcome("paused", "max_rounds_reached")
        return RunOutcome("completed", reason)

    # --- translation --------------------------------------------------------

    def _enter(self, agent: str) -> list[EngineEvent]:
        """Phase divider events when ``agent`` speaks in a new phase."""
        self.state.speaker = agent
        phase = self.mode.phase_of(agent, planned=bool(self.state.plan))
        if phase == self.state.phase:
            return []
        self.state.phase = phase
        return [EngineEvent(EventKind.PHASE, agent=agent, content=phase, data={"phase": phase})]

    def _translate(self, item: object) -> list[EngineEvent]:
        usage = getattr(item, "models_usage", None)
        tokens = {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
        }
        source = getattr(item, "source", "")
        if isinstance(item, TextMessage) and source == "user":
            return [EngineEvent(EventKind.TASK, agent="user", content=item.content)]
        events = self._enter(source) if source and source != "user" else []
        role = {"role": role_of(source)}
        if isinstance(item, ThoughtEvent | TextMessage):
            self.state.turns += 1
            events.append(EngineEvent(EventKind.MESSAGE, agent=source, content=item.content, data=role, **tokens))
            events.extend(self._structure(source, item.content))
        elif isinstance(item, ToolCallRequestEvent):
            calls = [c for c in item.content if not c.name.startswith(HANDOFF_PREFIX)]
            if calls:
                events.append(
                    EngineEvent(
                        EventKind.TOOL_CALL,
                        agent=source,
                        content=calls[0].name,
                        data={**role, "calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]},
                        **tokens,
                    )
                )
            elif tokens["prompt_tokens"] or tokens["completion_tokens"]:
                # A handoff-only call still cost tokens: carry them on the handoff event.
                self._handoff_tokens = tokens
        elif isinstance(item, ToolCallExecutionEvent):
            results = [r for r in item.content if not r.name.startswith(HANDOFF_PREFIX)]
            for result in results:
                events.append(
                    EngineEvent(
                        EventKind.TOOL_RESULT,
                        agent=source,
                        content=result.content,
                        data={**role, "name": result.name, "call_id": result.call_id, "is_error": bool(result.is_error)},
                    )
                )
                if result.name == "execute_code" and self._artifacts_by_execution:
                    for artifact in self._artifacts_by_execution.popleft():
                        events.append(EngineEvent(EventKind.ARTIFACT, agent=source, content=artifact["path"], data=artifact))
        elif isinstance(item, HandoffMessage):
            spent = self._handoff_tokens or {"prompt_tokens": 0, "completion_tokens": 0}
            self._handoff_tokens = None
            events.append(
                EngineEvent(
                    EventKind.HANDOFF,
                    agent=source,
                    content=item.target,
                    data={**role, "target": item.target, "target_role": role_of(item.target)},
                    **spent,
                )
            )
        return events

    def _structure(self, agent: str, text: str) -> list[EngineEvent]:
        """Plan and step events read from what planner and control said."""
        if agent == "planner" and "## Plan" in text:
            plan = [
                {"number": int(n), "agent": who, "description": desc, "status": "pending"}
                for n, who, desc in PLAN_LINE.findall(text)
            ]
            if plan:
                self.state.plan = plan
                self.state.step = 0
                return [EngineEvent(EventKind.PLAN, agent=agent, content=f"{len(plan)} steps", data={"steps": plan})]
        if agent == "control":
            match = STEP_MARK.search(text)
            if match:
                number = int(match.group(1))
                for step in self.state.plan:
                    if step["number"] < number:
                        step["status"] = "done"
                    elif step["number"] == number:
                        step["status"] = "running"
                self.state.step = number
                return [EngineEvent(EventKind.STEP, agent=agent, content=text, data={"step": number, "of": int(match.group(2))})]
            if self.state.plan and "steps are done" in text:
                for step in self.state.plan:
                    step["status"] = "done"
        return []
