"""Human in the loop as request and answer.

Where a person must decide, the team is stopped by a :class:`Gate` (an autogen
termination condition, so nothing runs past the point of decision), the engine
emits an ``approval`` event saying what is asked and which answers are
possible, and the run ends with outcome ``waiting``. Nothing waits in memory:
``SwarmOrchestrator.resume(log, answer)`` later turns the :class:`Answer` into
a ``decision`` event, and the decision into a message handed to the agent that
acts on it, so the person's feedback and edits are in that agent's next
prompt (and in every prompt rebuilt from the log after it).
"""
from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autogen_agentchat.base import TerminationCondition
from autogen_agentchat.messages import BaseAgentEvent, BaseChatMessage, HandoffMessage, StopMessage

from orchestrator.engine.events import EngineEvent, EventKind

HUMAN = "human"  # the source of decisions in the conversation
GATE_PREFIX = "approval:"
MAX_FEEDBACK_CHARS = 4_000
MAX_CODE_CHARS = 50_000


class Request(enum.StrEnum):
    PLAN = "plan"  # approve the agreed plan before any step runs
    STEP = "step"  # a checkpoint after each step of the plan
    CODE = "code"  # a guard before the executor runs code
    ERROR = "error"  # code failed: retry, skip or abort
    COPILOT_TURN = "copilot_turn"  # the team answered: send the next request, or finish
    BUDGET = "budget"  # the round budget is spent: continue with a fresh one, or stop

    @property
    def options(self) -> tuple[str, ...]:
        return {
            Request.PLAN: ("approve", "reject", "edit"),
            Request.STEP: ("continue", "skip", "redo", "abort"),
            Request.CODE: ("allow", "allow_session", "deny", "edit"),
            Request.ERROR: ("retry", "skip", "abort"),
            Request.COPILOT_TURN: ("reply", "finish"),
            Request.BUDGET: ("continue", "stop"),
        }[self]

    @property
    def default(self) -> str:
        """The answer given by ``--auto-approve`` and by an approving expiry policy."""
        return {
            Request.PLAN: "approve",
            Request.STEP: "continue",
            Request.CODE: "allow",
            Request.ERROR: "retry",
            Request.COPILOT_TURN: "finish",
            Request.BUDGET: "continue",
        }[self]


OPTION_LABELS = {
    "approve": "Approve",
    "reject": "Reject with feedback",
    "edit": "Edit",
    "continue": "Continue",
    "skip": "Skip",
    "redo": "Redo",
    "abort": "Abort",
    "allow": "Allow",
    "allow_session": "Allow for this session",
    "deny": "Deny",
    "retry": "Retry",
    "reply": "Send",
    "finish": "Finish",
    "stop": "Stop",
}


def is_budget(event: EngineEvent) -> bool:
    """A round-budget request or its decision: the person's, never the team's conversation."""
    return event.kind in (EventKind.APPROVAL, EventKind.DECISION) and event.data.get("request") == Request.BUDGET


class AnswerError(ValueError):
    """An answer that does not fit the open request; nothing is recorded."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Which decisions a session leaves to a person."""

    plan: bool = False
    steps: bool = False
    code: bool = False
    errors: bool = False
    copilot_turn: bool = False

    @classmethod
    def for_session(cls, mode: str, config: Mapping[str, Any] | None = None) -> Policy:
        config = config or {}
        return cls(
            plan=mode in ("hitl_plan", "hitl_both"),
            steps=mode in ("hitl_steps", "hitl_both"),
            code=bool(config.get("approve_code")),
            errors=bool(config.get("approve_errors")),
            copilot_turn=mode == "copilot" and bool(config.get("chat")),
        )

    def gate_for(self, message: BaseChatMessage | BaseAgentEvent, *, code_allowed: bool) -> Request | None:
        """The decision a message hands to a person under this policy, if any."""
        if not isinstance(message, HandoffMessage):
            return None
        source, target = message.source, message.target
        if self.plan and source == "plan_reviewer" and target == "control":
            return Request.PLAN
        if self.steps and target == "control" and source in ("researcher", "executor", "engineer"):
            return Request.STEP
        if self.code and not code_allowed and source == "engineer" and target == "executor":
            return Request.CODE
        if self.errors and source == "executor" and target == "engineer":
            return Request.ERROR
        if self.copilot_turn and source == "summarizer" and target == "terminator":
            return Request.COPILOT_TURN
        return None


class Gate(TerminationCondition):
    """Stops the team when the newest message is one a person must decide on."""

    def __init__(self, policy: Policy, *, code_allowed: bool = False) -> None:
        self.policy = policy
        self.code_allowed = code_allowed
        self._terminated = False

    @property
    def terminated(self) -> bool:
        return self._terminated

    async def __call__(self, messages: Sequence[BaseAgentEvent | BaseChatMessage]) -> StopMessage | None:
        if self._terminated:
            raise RuntimeError("the gate is already closed; reset it first")
        # Only the newest message counts: a conversation replayed from the log
        # passes earlier gates that were already decided.
        request = self.policy.gate_for(messages[-1], code_allowed=self.code_allowed) if messages else None
        if request is None:
            return None
        self._terminated = True
        return StopMessage(content=f"{GATE_PREFIX}{request}", source="Gate")

    async def reset(self) -> None:
        self._terminated = False


@dataclass(frozen=True, slots=True)
class Answer:
    """A person's decision on an open request."""

    decision: str
    feedback: str = ""
    edits: dict[str, Any] = field(default_factory=dict)
    by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "feedback": self.feedback, "edits": dict(self.edits), "by": self.by}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Answer:
        return cls(
            decision=str(raw.get("decision", "")),
            feedback=str(raw.get("feedback") or ""),
            edits=dict(raw.get("edits") or {}),
            by=str(raw.get("by") or ""),
        )


def open_request(log: Sequence[EngineEvent]) -> EngineEvent | None:
    """The approval event at the end of ``log`` that no decision has answered yet."""
    for event in reversed(log):
        if event.kind == EventKind.DECISION:
            return None
        if event.kind == EventKind.APPROVAL:
            return event
        if event.kind not in (EventKind.STATUS, EventKind.ERROR):
            return None
    return None


STEP_AGENTS = ("researcher", "engineer")  # who a plan's step can be for


def _clean_steps(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise AnswerError("An edited plan needs at least one step.")
    steps = []
    for number, item in enumerate(raw, 1):
        if isinstance(item, Mapping):
            agent, description = str(item.get("agent", "")), str(item.get("description", ""))
        else:
            agent, description = "", str(item)
        description = re.sub(r"\s+", " ", description).strip()
        agent = agent.strip().lower()
        if agent and agent not in STEP_AGENTS:
            raise AnswerError(
                f"Step {number} of the edited plan is for {agent[:40]!r}; a step is for the {' or the '.join(STEP_AGENTS)}, "
                "or leave out the [agent] and one is chosen from the step's words."
            )
        if not agent:
            agent = "engineer" if re.search(r"\b(code|compute|plot|run|simulat)", description, re.I) else "researcher"
        if not description:
            raise AnswerError(f"Step {number} of the edited plan is empty.")
        if len(description) > 500:
            raise AnswerError(f"Step {number} of the edited plan is longer than 500 characters.")
        steps.append({"number": number, "agent": agent, "description": description, "status": "pending"})
    if len(steps) > 20:
        raise AnswerError("An edited plan may have at most 20 steps.")
    return steps


def validate(request: EngineEvent, answer: Answer) -> Answer:
    """``answer`` checked against ``request``, with its edits normalised; else :class:`AnswerError`."""
    options = request.data.get("options", [])
    if answer.decision not in options:
        raise AnswerError(f"{answer.decision!r} is not an answer to this request; choose one of: {', '.join(options)}.")
    if len(answer.feedback) > MAX_FEEDBACK_CHARS:
        raise AnswerError(f"Feedback is limited to {MAX_FEEDBACK_CHARS:,} characters.")
    kind = Request(request.data["request"])
    edits: dict[str, Any] = {}
    if answer.decision == "edit" and kind == Request.PLAN:
        edits["steps"] = _clean_steps(answer.edits.get("steps"))
    elif answer.decision == "edit" and kind == Request.CODE:
        code = str(answer.edits.get("code") or "")
        if not code.strip():
            raise AnswerError("Edited code cannot be empty.")
        if len(code) > MAX_CODE_CHARS:
            raise AnswerError(f"Edited code is limited to {MAX_CODE_CHARS:,} characters.")
        edits["code"] = code.replace("```", "")
    elif answer.decision == "reject" and not answer.feedback.strip():
        raise AnswerError("Say what should change: rejecting a plan needs feedback for the planner.")
    elif answer.decision == "reply" and not answer.feedback.strip():
        raise AnswerError("The next request is empty.")
    return Answer(decision=answer.decision, feedback=answer.feedback.strip(), edits=edits, by=answer.by)


def plan_markdown(steps: Sequence[Mapping[str, Any]]) -> str:
    return "## Plan\n\n" + "\n".join(f"{s['number']}. [{s['agent']}] {s['description']}" for s in steps)


def decision_event(request: EngineEvent, answer: Answer, *, planned: bool) -> EngineEvent:
    """The event recording ``answer``, with the message (and its target agent) that carries it to the team."""
    kind = Request(request.data["request"])
    decision, feedback = answer.decision, answer.feedback
    said = f"\n\nFeedback from the human: {feedback}" if feedback else ""
    step, of = int(request.data.get("step", 0)), int(request.data.get("of", 0))
    target, text = "", ""
    if kind == Request.PLAN:
        if decision == "approve":
            target, text = "control", f"**Human decision on the plan: approved.**{said}"
        elif decision == "reject":
            target, text = "planner", f"**Human decision on the plan: rejected.**{said}\n\nRevise the plan to address this feedback."
        else:
            target = "control"
            text = f"**Human decision on the plan: edited.** Follow this plan instead.\n\n{plan_markdown(answer.edits['steps'])}{said}"
    elif kind == Request.STEP:
        target = "control"
        text = {
            "continue": f"**Human decision after step {step}: continue.**",
            "skip": f"**Human decision after step {step}: skip step {step + 1}.**",
            "redo": f"**Human decision after step {step}: redo step {step}.**",
            "abort": f"**Human decision after step {step}: abort.**",
        }[decision] + said
        if decision == "abort":
            target = "terminator"
    elif kind == Request.CODE:
        if decision in ("allow", "allow_session"):
            scope = " for the rest of this session" if decision == "allow_session" else ""
            target, text = "executor", f"**Human decision on the code: allowed{scope}.** Run it.{said}"
        elif decision == "deny":
            target, text = "engineer", f"**Human decision on the code: denied.** Do not run it.{said}"
        else:
            target = "executor"
            text = f"**Human decision on the code: edited.** Run this version instead.\n\n```python\n{answer.edits['code']}\n```{said}"
    elif kind == Request.ERROR:
        if decision == "retry":
            target, text = "engineer", f"**Human decision on the error: retry.** Fix the code and run it again.{said}"
        elif decision == "abort":
            target, text = "terminator", f"**Human decision on the error: abort.**{said}"
        else:
            target = "control" if planned else "summarizer"
            text = f"**Human decision on the error: {decision}.**{said}"
    elif kind == Request.BUDGET:
        # Not a message to the team: a continued run picks up where the budget ran out.
        text = {
            "continue": "**Human decision on the round budget: continue** with a fresh budget.",
            "stop": "**Human decision on the round budget: stop** the run here.",
        }[decision] + said
    else:
        if decision == "reply":
            target, text = "copilot_control", f"**Next request:** {feedback}"
        else:
            target, text = "terminator", "**Human decision: finish.** The session is complete."
    data: dict[str, Any] = {
        "request": str(kind),
        "decision": decision,
        "feedback": feedback,
        "edits": dict(answer.edits),
        "by": answer.by,
        "target": target,
        "message": text,
    }
    if kind == Request.STEP:
        data.update(step=step, of=of)
    return EngineEvent(EventKind.DECISION, agent=HUMAN, content=text, data=data)
