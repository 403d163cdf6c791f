"""SwarmOrchestrator: runs a mode's team on autogen's Swarm and yields events.

Every autogen message becomes one or more typed :class:`EngineEvent` objects,
each paired with a checkpoint: the small dict of what the event log itself does
not hold (phase, step, plan, counters, context variables). A checkpoint's size
does not grow with the history, so saving one after every event is O(1).

The checkpoint is a fold over the events (:meth:`Checkpoint.apply`), and the
conversation is the events themselves, so a run can be continued from its log
alone: :meth:`SwarmOrchestrator.run` with ``history`` replays the log up to its
last complete turn into a fresh Swarm and goes on from there. Events of an
unfinished turn at the end of the log are produced again by the team and
recognised, not repeated.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autogen_agentchat.base import TaskResult
from autogen_agentchat.conditions import TextMentionTermination
from autogen_agentchat.messages import (
    BaseChatMessage,
    HandoffMessage,
    TextMessage,
    ThoughtEvent,
    ToolCallExecutionEvent,
    ToolCallRequestEvent,
    ToolCallSummaryMessage,
)
from autogen_agentchat.teams import Swarm
from autogen_core import FunctionCall
from autogen_core.models import ChatCompletionClient, FunctionExecutionResult

from orchestrator.engine.agents import build_agents, role_of
from orchestrator.engine.events import EngineEvent, EventKind
from orchestrator.engine.execution import CodeRunner
from orchestrator.engine.hitl import (
    GATE_PREFIX,
    HUMAN,
    Answer,
    AnswerError,
    Gate,
    Policy,
    Request,
    decision_event,
    is_budget,
    open_request,
    validate,
)
from orchestrator.engine.models import ModelConfig, client_factory
from orchestrator.engine.modes import Mode
from orchestrator.engine.offline import CODE_BLOCK, PLAN_LINE, STEP_MARK
from orchestrator.engine.phases import PHASE_TOOLS
from orchestrator.engine.runtime import quiet_team

logger = logging.getLogger(__name__)

HANDOFF_PREFIX = "transfer_to_"


def _is_handoff(tool: str) -> bool:
    return tool.startswith(HANDOFF_PREFIX) or tool in PHASE_TOOLS


MAX_ROUNDS_REACHED = "max_rounds_reached"


@dataclass(slots=True)
class RunOutcome:
    """How a run ended: ``completed``, ``paused`` (round budget), ``waiting`` (for a
    person's answer; the reason names the request), ``cancelled`` (a person aborted)
    or ``failed``."""

    status: str
    reason: str = ""


@dataclass(slots=True)
class Checkpoint:
    """What the event log does not say outright, derived from it event by event."""

    phase: str = ""
    step: int = 0
    plan: list[dict[str, Any]] = field(default_factory=list)
    speaker: str = ""
    turns: int = 0
    continuations: int = 0
    context_variables: dict[str, Any] = field(default_factory=dict)
    waiting: dict[str, Any] | None = None  # the open approval request, if any

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": self.step,
            "plan": [dict(s) for s in self.plan],
            "speaker": self.speaker,
            "turns": self.turns,
            "continuations": self.continuations,
            "context_variables": dict(self.context_variables),
            "waiting": dict(self.waiting) if self.waiting else None,
        }

    def apply(self, event: EngineEvent) -> None:
        if event.kind == EventKind.PHASE:
            self.phase = event.content
        elif event.kind == EventKind.MESSAGE:
            self.turns += 1
            self.speaker = event.agent
            if event.agent == "control" and self.plan and "steps are done" in event.content:
                for step in self.plan:
                    if step["status"] != "skipped":
                        step["status"] = "done"
        elif event.kind == EventKind.PLAN:
            self.plan = [dict(s) for s in event.data["steps"]]
            self.step = 0
        elif event.kind == EventKind.STEP:
            number = event.data["step"]
            for step in self.plan:
                if step["number"] < number and step["status"] != "skipped":
                    step["status"] = "done"
                elif step["number"] == number:
                    step["status"] = "running"
            self.step = number
        elif event.kind == EventKind.APPROVAL:
            self.waiting = {"request": event.data.get("request"), "options": list(event.data.get("options", []))}
        elif event.kind == EventKind.DECISION:
            self.waiting = None
            decision = event.data.get("decision")
            if decision == "allow_session":
                self.context_variables["code_allowed"] = True
            elif decision == "skip" and event.data.get("request") == Request.STEP:
                for step in self.plan:
                    if step["number"] == event.data.get("step", 0) + 1:
                        step["status"] = "skipped"
            if event.data.get("edits", {}).get("steps"):
                self.plan = [dict(s) for s in event.data["edits"]["steps"]]
                self.step = 0
            if event.data.get("feedback"):
                self.context_variables["last_feedback"] = event.data["feedback"][:500]


# The worker's status events that follow a turn only once it is over: the run ended on its own.
TURN_END_STATUSES = frozenset({"paused", "completed", "waiting_approval"})


def _interrupts(event: EngineEvent) -> bool:
    """Whether ``event`` is the worker's note of a run stopped, failed or claimed again: it can come in the
    middle of a turn (a run killed between a tool result and its artifacts, then taken over), so it says
    nothing about whether the turn before it was complete."""
    if event.kind == EventKind.ERROR:
        return True
    if event.kind != EventKind.STATUS or event.data.get("auto_continue"):
        return False
    return event.data.get("status") not in TURN_END_STATUSES


def _ends_turn(events: Sequence[EngineEvent], i: int) -> bool:
    """Whether the team could be started afresh right after ``events[i]``."""
    event = events[i]
    following = next((e for e in events[i + 1 :] if not _interrupts(e)), None)
    if is_budget(event):
        return False  # like the worker's status events: the turn before it ended (or not) on its own
    if event.kind in (EventKind.TASK, EventKind.HANDOFF, EventKind.APPROVAL, EventKind.DECISION):
        return True
    if event.kind == EventKind.PLAN and event.agent == HUMAN:
        return True  # an edited plan, recorded with its decision
    if event.kind == EventKind.MESSAGE:
        return bool(event.data.get("final"))
    if event.kind in (EventKind.TOOL_RESULT, EventKind.ARTIFACT):
        # Complete only once something else follows (the next turn, or the
        # worker's "paused"): at the very end of the log, or before only a
        # takeover's or a failure's status, artifacts may still be missing,
        # so the turn is done again and matched against the log.
        return following is not None and following.kind not in (EventKind.ARTIFACT, EventKind.TOOL_RESULT)
    return False


def split_history(events: Sequence[EngineEvent]) -> tuple[list[EngineEvent], list[EngineEvent]]:
    """The log up to its last complete turn, and the unfinished rest."""
    for i in range(len(events) - 1, -1, -1):
        if _ends_turn(events, i):
            # Structure events right after a boundary (plan, step) belong to the turn before it.
            return list(events[: i + 1]), list(events[i + 1 :])
    return [], list(events)


def messages_from_log(events: Sequence[EngineEvent]) -> list[BaseChatMessage]:
    """The chat messages the team exchanged, rebuilt from engine events."""
    messages: list[BaseChatMessage] = []
    calls: dict[str, FunctionCall] = {}
    for event in events:
        if event.kind == EventKind.TASK:
            messages.append(TextMessage(source="user", content=event.content))
        elif event.kind == EventKind.MESSAGE:
            messages.append(TextMessage(source=event.agent, content=event.content))
        elif event.kind == EventKind.TOOL_CALL:
            for call in event.data.get("calls", []):
                calls[call["id"]] = FunctionCall(id=call["id"], name=call["name"], arguments=call["arguments"])
        elif event.kind == EventKind.TOOL_RESULT:
            call_id = event.data.get("call_id", "")
            call = calls.get(call_id) or FunctionCall(id=call_id, name=event.data.get("name", ""), arguments="{}")
            messages.append(
                ToolCallSummaryMessage(
                    source=event.agent,
                    content=event.content,
                    tool_calls=[call],
                    results=[
                        FunctionExecutionResult(
                            content=event.content, name=call.name, call_id=call_id, is_error=bool(event.data.get("is_error"))
                        )
                    ],
                )
            )
        elif event.kind == EventKind.DECISION and not is_budget(event):
            # The decision reaches the team as a handoff from the human to the agent that acts on it.
            messages.append(HandoffMessage(source=HUMAN, target=event.data["target"], content=event.data["message"]))
        elif event.kind == EventKind.HANDOFF:
            target = event.data.get("target", event.content)
            messages.append(
                HandoffMessage(
                    source=event.agent, target=target, content=f"Transferred to {target}, adopting the role of {target} immediately."
                )
            )
    return messages


def _same(a: EngineEvent, b: EngineEvent) -> bool:
    return (a.kind, a.agent, a.content) == (b.kind, b.agent, b.content)


class SwarmOrchestrator:
    """Runs one task with one mode's team and yields ``(event, checkpoint)`` pairs.

    After :meth:`run` is exhausted, :attr:`outcome` says how it ended. Each
    call of :meth:`run` has a budget of ``max_turns`` agent turns (rounds);
    when it is spent the outcome is ``paused`` with reason
    ``max_rounds_reached``, and calling :meth:`run` again with the log so far
    continues with a fresh budget.
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
        auto_continue: int = 0,
        code_timeout: float = 30.0,
        policy: Policy | None = None,
    ) -> None:
        self.task = task
        self.mode = Mode(mode)
        self.runner = CodeRunner(work_dir, timeout=code_timeout)
        self.model = model or ModelConfig()
        # Validates the model settings now: a missing key fails before anything runs.
        self.client_for = client_for or client_factory(self.model)
        self.max_turns = max_turns
        # How many spent budgets to continue past without asking: a hard ceiling.
        self.auto_continue = max(0, auto_continue)
        # Which decisions wait for a person (hitl modes, code and error guards).
        self.policy = policy or Policy.for_session(str(self.mode))
        self.state = Checkpoint()
        self.outcome: RunOutcome | None = None
        # The newest code block and failed execution, quoted by approval requests.
        self._last_code = ""
        self._last_failure = ""
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
        gate = Gate(self.policy, code_allowed=bool(self.state.context_variables.get("code_allowed")))
        team = Swarm(
            agents,
            termination_condition=TextMentionTermination("TERMINATE", sources=["terminator"]) | gate,
            max_turns=self.max_turns,
        )
        return quiet_team(team)

    async def run(self, history: Sequence[EngineEvent] = ()) -> AsyncIterator[tuple[EngineEvent, dict[str, Any]]]:
        """Run the team, or continue it from ``history`` (the engine events logged so far).

        With ``auto_continue``, a spent round budget is continued past up to
        that many times before the run pauses for a person.
        """
        log = list(history)
        automatic = 0
        request = open_request(log)
        if request is not None:
            # Still waiting for the person: nothing runs and nothing is asked twice.
            self.outcome = RunOutcome("waiting", request.data.get("request", ""))
            return
        while True:
            async for event, checkpoint in self._run_once(log):
                log.append(event)
                yield event, checkpoint
            if not (self.outcome and self.outcome.status == "paused"):
                return
            if automatic >= self.auto_continue:
                # The budget is a person's decision now: continue with a fresh one, or stop.
                request = self._budget_request()
                self.state.apply(request)
                yield request, self.state.to_dict()
                return
            automatic += 1
            # Logged, so a later continuation (in another process) still counts it.
            note = EngineEvent(
                EventKind.STATUS,
                content=f"The round budget was spent; continuing automatically ({automatic} of {self.auto_continue}).",
                data={"status": "running", "auto_continue": automatic},
            )
            log.append(note)
            yield note, self.state.to_dict()

    async def resume(
        self, history: Sequence[EngineEvent], answer: Answer
    ) -> AsyncIterator[tuple[EngineEvent, dict[str, Any]]]:
        """Answer the request that ``history`` (the event log) ends waiting on, and go on.

        The first event yielded is the decision itself; the run then continues
        as :meth:`run` does. An answer that does not fit the request raises
        :class:`~orchestrator.engine.hitl.AnswerError` before anything is yielded.
        """
        log = list(history)
        request = open_request(log)
        if request is None:
            raise AnswerError("Nothing in this session is waiting for an answer.")
        answer = validate(request, answer)
        self.state = Checkpoint()
        for event in log:
            if event.kind not in (EventKind.STATUS, EventKind.ERROR):
                self.state.apply(event)
        decision = decision_event(request, answer, planned=bool(self.state.plan))
        added = [decision]
        if answer.edits.get("steps"):
            steps = answer.edits["steps"]
            added.append(EngineEvent(EventKind.PLAN, agent=HUMAN, content=f"{len(steps)} steps (edited)", data={"steps": steps}))
        for event in added:
            self.state.apply(event)
            log.append(event)
            yield event, self.state.to_dict()
        if answer.decision == "abort":
            self.outcome = RunOutcome("cancelled", f"aborted by {answer.by or 'a person'}")
            return
        if answer.decision == "stop":
            self.outcome = RunOutcome("cancelled", f"stopped at the round budget by {answer.by or 'a person'}")
            return
        async for pair in self.run(log):
            yield pair

    async def _run_once(self, history: Sequence[EngineEvent]) -> AsyncIterator[tuple[EngineEvent, dict[str, Any]]]:
        self.outcome = None
        # Status and error events are the worker's, not the team's; they still
        # mark where a turn ended, so they are dropped only after the split.
        done, unfinished = (
            [e for e in part if e.kind not in (EventKind.STATUS, EventKind.ERROR) and not is_budget(e)]
            for part in split_history(list(history))
        )
        self.state = Checkpoint()
        for event in done:
            self.state.apply(event)
            self._note(event)
        task: str | list[BaseChatMessage] = self.task
        if done:
            self.state.continuations = sum(
                1 for e in history if e.kind == EventKind.STATUS and (e.data.get("status") == "paused" or e.data.get("auto_continue"))
            )
            task = messages_from_log(done)
        echoes = len(task) if isinstance(task, list) else 0
        pending = collections.deque(unfinished)
        team = self._team()
        try:
            async for item in team.run_stream(task=task):
                if echoes:
                    echoes -= 1  # the replayed messages come back first
                    continue
                if isinstance(item, TaskResult):
                    self.outcome = self._outcome_of(item)
                    continue
                for event in self._structured(self._translate(item)):
                    self._note(event)
                    if pending and _same(pending[0], event):
                        pending.popleft()  # already in the log: not repeated
                        continue
                    pending.clear()
                    yield event, self.state.to_dict()
            if self.outcome is not None and self.outcome.status == "waiting":
                request = self._request(Request(self.outcome.reason))
                self.state.apply(request)
                yield request, self.state.to_dict()
        except Exception as exc:  # noqa: BLE001 - any failure of the team ends the run visibly
            logger.exception("run failed")
            self.outcome = RunOutcome("failed", f"{type(exc).__name__}: {exc}")
            yield EngineEvent(EventKind.ERROR, content=self.outcome.reason), self.state.to_dict()

    def _outcome_of(self, result: TaskResult) -> RunOutcome:
        reason = result.stop_reason or ""
        if reason.startswith(GATE_PREFIX):
            return RunOutcome("waiting", reason.removeprefix(GATE_PREFIX))
        if "Maximum number of turns" in reason:
            return RunOutcome("paused", MAX_ROUNDS_REACHED)
        return RunOutcome("completed", reason)

    # --- approval requests --------------------------------------------------

    def _note(self, event: EngineEvent) -> None:
        """Remember what an approval request may quote: the newest code and failure."""
        if event.kind == EventKind.MESSAGE and event.agent == "engineer":
            blocks = CODE_BLOCK.findall(event.content)
            if blocks:
                self._last_code = blocks[-1]
        elif event.kind == EventKind.DECISION and event.data.get("edits", {}).get("code"):
            self._last_code = event.data["edits"]["code"]
        elif event.kind == EventKind.TOOL_RESULT and event.data.get("name") == "execute_code":
            self._last_failure = "" if "execution succeeded" in event.content else event.content

    def _budget_request(self) -> EngineEvent:
        """The approval event for a spent round budget."""
        state = self.state
        used = f"{self.max_turns} turns" if self.max_turns else "its turns"
        content = f"The team used {used} of this run's round budget. Continue with a fresh budget, or stop the run here."
        data = {
            "request": str(Request.BUDGET),
            "phase": state.phase,
            "step": state.step,
            "of": len(state.plan),
            "max_turns": self.max_turns,
            "turns": state.turns,
            "continuations": state.continuations + 1,
            "options": list(Request.BUDGET.options),
        }
        return EngineEvent(EventKind.APPROVAL, agent=state.speaker, content=content, data=data)

    def _request(self, kind: Request) -> EngineEvent:
        """The approval event for a gate the team stopped at, from the state it stopped in."""
        state = self.state
        options = list(kind.options)
        data: dict[str, Any] = {"request": str(kind), "phase": state.phase}
        if kind == Request.PLAN:
            agent = "plan_reviewer"
            content = f"The team agreed on a plan of {len(state.plan)} steps. Approve it, reject it with feedback, or edit the steps."
            data["plan"] = [dict(s) for s in state.plan]
        elif kind == Request.STEP:
            agent, of = "control", len(state.plan)
            data.update(step=state.step, of=of, phase="hitl_checkpoint")
            if state.step >= of:
                options.remove("skip")  # nothing left to skip
            done = next((s["description"] for s in state.plan if s["number"] == state.step), "")
            content = f"Step {state.step} of {of} is done: {done}. Continue, skip the next step, redo this one, or abort."
        elif kind == Request.CODE:
            agent = "executor"
            data["code"] = self._last_code
            content = "The engineer wants to run this code. Allow it, allow code for the rest of the session, deny it, or edit it."
        elif kind == Request.ERROR:
            agent = "executor"
            data.update(code=self._last_code, error=self._last_failure[-4000:])
            content = "The code failed. Retry with a fix, skip this part, or abort the run."
        else:
            agent = "copilot_control"
            content = "The team has answered. Send the next request, or finish the session."
        data["options"] = options
        return EngineEvent(EventKind.APPROVAL, agent=agent, content=content, data=data)

    # --- translation --------------------------------------------------------

    def _structured(self, events: list[EngineEvent]) -> list[EngineEvent]:
        """Add phase, plan and step events around ``events``, applying all to the state."""
        out: list[EngineEvent] = []
        for event in events:
            agent = event.agent
            if event.kind != EventKind.TASK and agent:
                phase = self.mode.phase_of(agent, planned=bool(self.state.plan))
                if phase != self.state.phase:
                    out.append(EngineEvent(EventKind.PHASE, agent=agent, content=phase, data={"phase": phase}))
                    self.state.apply(out[-1])
            out.append(event)
            self.state.apply(event)
            if event.kind == EventKind.MESSAGE:
                for derived in self._structure(agent, event.content):
                    out.append(derived)
                    self.state.apply(derived)
        return out

    def _translate(self, item: object) -> list[EngineEvent]:
        source = getattr(item, "source", "")
        usage = getattr(item, "models_usage", None)
        tokens: dict[str, Any] = {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
        }
        if usage:
            tokens["cost_usd"] = self.model.cost(source, usage.prompt_tokens, usage.completion_tokens)
        if isinstance(item, TextMessage) and source == "user":
            return [EngineEvent(EventKind.TASK, agent="user", content=item.content)]
        role = {"role": role_of(source), "model": self.model.model_of(source)}
        if isinstance(item, ThoughtEvent | TextMessage):
            # A thought goes with a tool call or handoff of the same reply; a text message is a whole turn.
            data = {**role, "final": isinstance(item, TextMessage)}
            return [EngineEvent(EventKind.MESSAGE, agent=source, content=item.content, data=data, **tokens)]
        if isinstance(item, ToolCallRequestEvent):
            calls = [c for c in item.content if not _is_handoff(c.name)]
            if calls:
                return [
                    EngineEvent(
                        EventKind.TOOL_CALL,
                        agent=source,
                        content=calls[0].name,
                        data={**role, "calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]},
                        **tokens,
                    )
                ]
            # A handoff-only call still cost tokens: carry them on the handoff event.
            self._handoff_tokens = tokens
            return []
        if isinstance(item, ToolCallExecutionEvent):
            events = []
            for result in item.content:
                if _is_handoff(result.name):
                    continue
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
            return events
        if isinstance(item, HandoffMessage):
            spent = self._handoff_tokens or {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
            self._handoff_tokens = None
            data = {**role, "target": item.target, "target_role": role_of(item.target)}
            if item.content.startswith("Invoked the "):
                data["phase"] = item.content.removeprefix("Invoked the ").split(" phase", 1)[0]
            return [EngineEvent(EventKind.HANDOFF, agent=source, content=item.target, data=data, **spent)]
        return []

    def _structure(self, agent: str, text: str) -> list[EngineEvent]:
        """Plan and step events read from what planner and control said."""
        if agent == "planner" and "## Plan" in text:
            plan = [
                {"number": int(n), "agent": who, "description": desc, "status": "pending"}
                for n, who, desc in PLAN_LINE.findall(text)
            ]
            if plan:
                return [EngineEvent(EventKind.PLAN, agent=agent, content=f"{len(plan)} steps", data={"steps": plan})]
        if agent == "control":
            match = STEP_MARK.search(text)
            if match:
                number = int(match.group(1))
                return [EngineEvent(EventKind.STEP, agent=agent, content=text, data={"step": number, "of": int(match.group(2))})]
        return []
