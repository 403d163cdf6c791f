"""Typed events that the engine yields, one per thing the team did."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class EventKind(enum.StrEnum):
    TASK = "task"  # the task handed to the team
    MESSAGE = "message"  # an agent's text (markdown, may contain code)
    TOOL_CALL = "tool_call"  # an agent asks for a tool to run
    TOOL_RESULT = "tool_result"  # what the tool returned
    HANDOFF = "handoff"  # one agent hands the conversation to another
    PLAN = "plan"  # the plan the team agreed on
    PHASE = "phase"  # the team moved to another phase
    STEP = "step"  # control started a step of the plan
    ARTIFACT = "artifact"  # a file written by executed code
    APPROVAL = "approval"  # a person must decide; the run waits for the answer
    DECISION = "decision"  # a person's answer to an approval request
    ERROR = "error"  # something failed; the cause is in content
    STATUS = "status"  # run lifecycle (written by the worker, not the engine)


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """One thing the team did. JSON-serialisable through :meth:`to_dict`."""

    kind: EventKind
    agent: str = ""
    content: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kind"] = str(self.kind)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineEvent:
        return cls(
            kind=EventKind(raw["kind"]),
            agent=raw.get("agent", ""),
            content=raw.get("content", ""),
            data=dict(raw.get("data") or {}),
            prompt_tokens=int(raw.get("prompt_tokens", 0)),
            completion_tokens=int(raw.get("completion_tokens", 0)),
            cost_usd=float(raw.get("cost_usd", 0.0)),
        )
