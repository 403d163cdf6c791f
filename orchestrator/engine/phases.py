"""The phase registry: ways of working that an agent can call as a tool.

Each phase is offered as a tool named ``invoke_<phase>_phase``; calling it
hands the conversation to the agent that leads that phase. copilot_control
uses them to route a request.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    name: str
    lead: str  # the agent that takes over when the phase is invoked
    description: str

    @property
    def tool_name(self) -> str:
        return f"invoke_{self.name}_phase"


PHASES: dict[str, PhaseSpec] = {
    spec.name: spec
    for spec in (
        PhaseSpec("planning", "planner", "Agree on a plan of steps with the plan reviewer, then carry it out step by step."),
        PhaseSpec("control", "control", "Walk an agreed plan one step at a time."),
        PhaseSpec("hitl_planning", "planner", "Plan as in planning, then wait for a person to approve, reject or edit the plan."),
        PhaseSpec("hitl_control", "control", "Walk the plan, stopping after each step for a person's checkpoint."),
        PhaseSpec("hitl_checkpoint", "control", "A person reviews the finished step: continue, skip the next, redo it, or abort."),
        PhaseSpec("one_shot", "engineer", "Answer directly: the engineer writes code and the executor runs it."),
        PhaseSpec("idea_generation", "idea_maker", "Propose research ideas and criticise them until the strongest remain."),
    )
}

PHASE_TOOLS = frozenset(spec.tool_name for spec in PHASES.values())
