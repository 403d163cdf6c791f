"""The ways of working a user can pick for a session."""
from __future__ import annotations

import enum


class Mode(enum.StrEnum):
    ONE_SHOT = "one_shot"
    PLANNING_AND_CONTROL = "planning_and_control"

    @property
    def label(self) -> str:
        return {
            Mode.ONE_SHOT: "One shot",
            Mode.PLANNING_AND_CONTROL: "Planning and control",
        }[self]

    @property
    def roster(self) -> tuple[str, ...]:
        """The agents taking part, the first one receiving the task."""
        return {
            Mode.ONE_SHOT: ("engineer", "executor", "summarizer", "terminator"),
            Mode.PLANNING_AND_CONTROL: (
                "planner",
                "plan_reviewer",
                "control",
                "researcher",
                "engineer",
                "executor",
                "summarizer",
                "terminator",
            ),
        }[self]

    def phase_of(self, agent: str) -> str:
        """The phase a speaking agent belongs to in this mode."""
        if self is Mode.ONE_SHOT:
            return "summary" if agent in ("summarizer", "terminator") else "one_shot"
        if agent in ("planner", "plan_reviewer"):
            return "planning"
        if agent in ("summarizer", "terminator"):
            return "summary"
        return "control"
