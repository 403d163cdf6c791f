"""The ways of working a user can pick for a session."""
from __future__ import annotations

import enum


class Mode(enum.StrEnum):
    ONE_SHOT = "one_shot"
    PLANNING_AND_CONTROL = "planning_and_control"
    # Planning and control with a person deciding: on the plan, after each step, or both.
    HITL_PLAN = "hitl_plan"
    HITL_STEPS = "hitl_steps"
    HITL_BOTH = "hitl_both"
    IDEA_GENERATION = "idea_generation"
    COPILOT = "copilot"

    @property
    def label(self) -> str:
        return {
            Mode.ONE_SHOT: "One shot",
            Mode.PLANNING_AND_CONTROL: "Planning and control",
            Mode.HITL_PLAN: "Planning and control, you approve the plan",
            Mode.HITL_STEPS: "Planning and control, you check each step",
            Mode.HITL_BOTH: "Planning and control, you approve the plan and check each step",
            Mode.IDEA_GENERATION: "Idea generation",
            Mode.COPILOT: "Copilot",
        }[self]

    @property
    def planned(self) -> bool:
        """Whether the mode always starts with planning."""
        return self in (Mode.PLANNING_AND_CONTROL, Mode.HITL_PLAN, Mode.HITL_STEPS, Mode.HITL_BOTH)

    @property
    def roster(self) -> tuple[str, ...]:
        """The agents taking part, the first one receiving the task."""
        if self.planned:
            return Mode.PLANNING_AND_CONTROL._roster
        return self._roster

    @property
    def _roster(self) -> tuple[str, ...]:
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
            Mode.IDEA_GENERATION: ("idea_maker", "idea_hater", "summarizer", "terminator"),
            Mode.COPILOT: (
                "copilot_control",
                "engineer",
                "executor",
                "researcher",
                "planner",
                "plan_reviewer",
                "control",
                "summarizer",
                "terminator",
            ),
        }[self]

    def phase_of(self, agent: str, *, planned: bool = False) -> str:
        """The phase a speaking agent belongs to in this mode (``planned``: a plan exists)."""
        if agent in ("summarizer", "terminator"):
            return "summary"
        if self is Mode.ONE_SHOT:
            return "one_shot"
        if self is Mode.IDEA_GENERATION:
            return "idea_generation"
        if agent == "copilot_control":
            return "copilot"
        if agent in ("planner", "plan_reviewer"):
            return "hitl_planning" if self in (Mode.HITL_PLAN, Mode.HITL_BOTH) else "planning"
        if self is Mode.COPILOT and not planned:
            return "one_shot"
        return "hitl_control" if self in (Mode.HITL_STEPS, Mode.HITL_BOTH) else "control"
