"""The agent roster: one spec per agent, in one registry.

Specs are data. :func:`build_agents` turns the specs a mode needs into autogen
``AssistantAgent`` objects wired for a Swarm (handoffs limited to the agents
taking part, tools bound to the run's code runner).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import Handoff
from autogen_core.models import ChatCompletionClient
from autogen_core.tools import FunctionTool

from orchestrator.engine.phases import PHASES

PLAN_FORMAT = (
    "Write the plan as a markdown list under a '## Plan' heading, one step per line, "
    "in the form '1. [agent] what the step does', where agent is researcher or engineer."
)


@dataclass(frozen=True, slots=True)
class AgentSpec:
    name: str
    role: str  # a short label shown next to the agent's name
    description: str
    prompt: str
    handoffs: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    phases: tuple[str, ...] = ()  # phases it may invoke as tools (invoke_<phase>_phase)


AGENTS: dict[str, AgentSpec] = {
    spec.name: spec
    for spec in (
        AgentSpec(
            "planner",
            "Planner",
            "Breaks the task into a short plan of steps for the team.",
            "You are the planner. Read the task and propose a plan. " + PLAN_FORMAT
            + " Then hand the plan to plan_reviewer.",
            handoffs=("plan_reviewer",),
        ),
        AgentSpec(
            "plan_reviewer",
            "Plan reviewer",
            "Checks the plan for gaps before work starts.",
            "You are the plan reviewer. Check the plan is complete and feasible, say what you "
            "would change, then hand over to control (or back to planner for a revision).",
            handoffs=("control", "planner"),
        ),
        AgentSpec(
            "control",
            "Control",
            "Walks the plan one step at a time and assigns each step.",
            "You are control. Announce the next step of the plan as '**Step k/n**' and hand it "
            "to the agent named in the plan. When every step is done, hand over to summarizer.",
            handoffs=("researcher", "engineer", "summarizer"),
        ),
        AgentSpec(
            "researcher",
            "Researcher",
            "Reasons about the science and writes findings in markdown.",
            "You are the researcher. Do the step assigned to you and report your findings in "
            "markdown, then hand back to control.",
            handoffs=("control",),
        ),
        AgentSpec(
            "engineer",
            "Engineer",
            "Writes Python code for computational steps.",
            "You are the engineer. Write one self-contained Python code block for the step; "
            "save plots and data to files in the working directory. Hand the code to executor. "
            "If a person denies running it, do not run it: hand back to control (or to summarizer).",
            handoffs=("executor", "control", "summarizer"),
        ),
        AgentSpec(
            "executor",
            "Executor",
            "Runs the engineer's code and reports its output.",
            "You are the executor. Run the latest Python code block with execute_code, report "
            "the outcome, then hand back to control (or to summarizer if there is no control).",
            handoffs=("control", "summarizer", "engineer"),
            tools=("execute_code",),
        ),
        AgentSpec(
            "idea_maker",
            "Idea maker",
            "Proposes research ideas.",
            "You are the idea maker. Propose several concrete research ideas for the task.",
            handoffs=("idea_hater",),
        ),
        AgentSpec(
            "idea_hater",
            "Idea critic",
            "Criticises the ideas and keeps the strongest.",
            "You are the idea critic. Find the weaknesses of each idea and say which survive.",
            handoffs=("idea_maker", "summarizer"),
        ),
        AgentSpec(
            "summarizer",
            "Summarizer",
            "Writes the final summary of what the team did and found.",
            "You are the summarizer. Summarise what the team did and found, then hand over to "
            "terminator.",
            handoffs=("terminator",),
        ),
        AgentSpec(
            "copilot_control",
            "Copilot control",
            "Routes a request to a one-shot answer or to planning.",
            "You are copilot control. Decide whether the request needs a plan or a direct answer, and "
            "invoke that phase: invoke_planning_phase or invoke_one_shot_phase.",
            phases=("planning", "one_shot"),
        ),
        AgentSpec(
            "terminator",
            "Terminator",
            "Ends the run.",
            "You are the terminator. Reply with the single word TERMINATE.",
        ),
    )
}


def role_of(agent: str) -> str:
    spec = AGENTS.get(agent)
    return spec.role if spec else agent.replace("_", " ").capitalize()


class LoopHandoff(Handoff):
    """A handoff whose tool answers on the event loop.

    autogen's own handoff tool wraps a plain function, and a plain function
    tool runs on the loop's thread pool: a thread hop, and its wake-ups, on
    every turn of a Swarm. This one is a coroutine, and built once per
    process for each (name, description, message): building one makes a
    pydantic model, ~0.5 ms, and the run launcher's rehearsal builds them
    before any run is forked.
    """

    @property
    def handoff_tool(self) -> FunctionTool:
        return _handoff_tool(self.name, self.description, self.message)


@functools.lru_cache(maxsize=256)
def _handoff_tool(name: str, description: str, message: str) -> FunctionTool:
    async def handoff() -> str:
        return message

    return FunctionTool(handoff, name=name, description=description, strict=True)


def build_agents(
    roster: Sequence[str],
    *,
    client_for: Callable[[str], ChatCompletionClient],
    tools: dict[str, Callable[..., object]],
    stream: bool = False,
) -> list[AssistantAgent]:
    """Build the autogen agents of ``roster``, handoffs limited to that roster."""
    taking_part = set(roster)
    agents = []
    for name in roster:
        spec = AGENTS[name]
        agents.append(
            AssistantAgent(
                name=spec.name,
                description=spec.description,
                system_message=spec.prompt,
                model_client=client_for(spec.name),
                handoffs=[LoopHandoff(target=target) for target in spec.handoffs if target in taking_part]
                + [
                    LoopHandoff(
                        target=PHASES[phase].lead,
                        name=PHASES[phase].tool_name,
                        description=PHASES[phase].description,
                        message=f"Invoked the {phase} phase; {PHASES[phase].lead} takes over.",
                    )
                    for phase in spec.phases
                    if PHASES[phase].lead in taking_part
                ],
                tools=[
                    FunctionTool(tools[tool], description=tools[tool].__doc__ or tool, name=tool)
                    for tool in spec.tools
                ],
                reflect_on_tool_use=False,
                model_client_stream=stream,
            )
        )
    return agents
