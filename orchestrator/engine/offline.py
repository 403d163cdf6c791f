"""The offline model: a deterministic ChatCompletionClient that needs no network.

It is a real implementation of autogen's model-client protocol. Each agent gets
its own client, and every reply is a pure function of the agent's name, the
messages it is shown and the tools it is offered: the same conversation always
gets the same reply, so a run is reproducible, and a conversation rebuilt from
the event log continues exactly as it would have.

It plays the whole team: plans with steps derived from the task, reviews,
step-by-step control, research notes, Python code that really runs and writes
a CSV file and a PNG plot, execution reports, summaries and termination.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import textwrap
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Literal

from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import (
    AssistantMessage,
    ChatCompletionClient,
    CreateResult,
    LLMMessage,
    ModelCapabilities,
    ModelInfo,
    RequestUsage,
    SystemMessage,
    UserMessage,
)
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel

OFFLINE_MODEL_NAME = "offline"
OFFLINE_MODEL_INFO = ModelInfo(
    vision=False,
    function_calling=True,
    json_output=False,
    family="offline",
    structured_output=False,
)
PLAN_LINE = re.compile(r"^\s*(\d+)\.\s*\[(researcher|engineer)\]\s*(.+?)\s*$", re.MULTILINE)
STEP_MARK = re.compile(r"\*\*Step (\d+)/(\d+)\*\*")
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
RETRY_WORD = re.compile(r"\bretry\b", re.IGNORECASE)
# A person's decisions, as the engine words them (see orchestrator.engine.hitl).
NEXT_REQUEST = "**Next request:** "
PLAN_REJECTED = re.compile(r"\*\*Human decision on the plan: rejected\.\*\*(?:\s*Feedback from the human: (.*?))?\n\nRevise", re.DOTALL)
STEP_DECISION = re.compile(r"\*\*Human decision after step \d+: (skip|redo) step (\d+)\.\*\*")
CODE_DENIED = "**Human decision on the code: denied.**"


def _words(text: str) -> int:
    return len(text.split())


def _text_of(message: LLMMessage) -> str:
    parts: list[str] = []
    thought = getattr(message, "thought", None)
    if thought:
        parts.append(thought)
    content = message.content
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for item in content:
            if isinstance(item, FunctionCall):
                parts.append(f"{item.name}({item.arguments})")
            elif hasattr(item, "content"):
                parts.append(str(item.content))
            else:
                parts.append(str(item))
    return "\n".join(parts)


def topic_of(task: str) -> str:
    """A short phrase naming the task, used to word plans and summaries."""
    plain = re.sub(r"[*_`#>\[\]]", "", task)  # markdown marks would be noise in step titles
    words = re.sub(r"\s+", " ", plain).strip().rstrip(".?!").split(" ")
    phrase = " ".join(words[:12])
    return phrase[0].lower() + phrase[1:] if phrase else "the task"


def plan_for(task: str) -> list[tuple[str, str]]:
    """Steps (agent, description) derived from the task text."""
    topic = topic_of(task)
    return [
        ("researcher", f"Review the background and the quantities involved in: {topic}"),
        ("engineer", f"Write and run Python code that computes, tabulates and plots {topic}"),
        ("researcher", f"Interpret the numbers and the plot, and state the conclusions for {topic}"),
    ]


def code_for(task: str, step: int) -> str:
    """A self-contained program that really computes something and writes files."""
    seed = int(hashlib.sha256(task.encode()).hexdigest()[:8], 16) % 1000
    return textwrap.dedent(
        f'''\
        import csv, math, struct, zlib

        SEED = {seed}
        N = 200
        xs = [i / (N - 1) * 4 * math.pi for i in range(N)]
        ys = [math.exp(-x / (6 + SEED % 5)) * math.cos(x * (1 + SEED % 3)) for x in xs]

        with open("results_step{step}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["x", "y"])
            writer.writerows(zip(xs, ys))

        W, H = 320, 160
        pixels = [[(255, 255, 255)] * W for _ in range(H)]
        for row in range(H):
            pixels[row][0] = (0, 0, 0)
        for col in range(W):
            pixels[H // 2][col] = (180, 180, 180)
        for x, y in zip(xs, ys):
            col = min(W - 1, int(x / xs[-1] * (W - 1)))
            row = min(H - 1, max(0, int((1 - (y + 1) / 2) * (H - 1))))
            pixels[row][col] = (31, 119, 180)

        def chunk(kind, data):
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

        raw = b"".join(b"\\x00" + bytes(v for px in line for v in px) for line in pixels)
        png = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
        png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        with open("plot_step{step}.png", "wb") as fh:
            fh.write(png)

        peak = max(ys)
        print(f"samples: {{N}}")
        print(f"peak amplitude: {{peak:.4f}}")
        print(f"mean: {{sum(ys) / N:.4f}}")
        '''
    )


class OfflineChatCompletionClient(ChatCompletionClient):
    """A deterministic model for one agent of the team."""

    def __init__(self, agent: str, *, latency: float = 0.0) -> None:
        self.agent = agent
        self.latency = latency  # seconds per reply, to look like a remote model in demos and load tests
        self._last_usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
        self._total_usage = RequestUsage(prompt_tokens=0, completion_tokens=0)

    # --- the protocol -------------------------------------------------------

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        if self.latency:
            await asyncio.sleep(self.latency)
        tool_names = {t.name if isinstance(t, Tool) else t["name"] for t in tools}
        thought, content = self._reply(list(messages), tool_names)
        prompt_tokens = self.count_tokens(messages)
        completion = (thought or "") + (content if isinstance(content, str) else json.dumps([c.arguments for c in content]))
        usage = RequestUsage(prompt_tokens=prompt_tokens, completion_tokens=_words(completion))
        self._last_usage = usage
        self._total_usage = RequestUsage(
            prompt_tokens=self._total_usage.prompt_tokens + usage.prompt_tokens,
            completion_tokens=self._total_usage.completion_tokens + usage.completion_tokens,
        )
        return CreateResult(
            finish_reason="function_calls" if isinstance(content, list) else "stop",
            content=content,
            usage=usage,
            cached=False,
            thought=thought,
        )

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        result = await self.create(messages, tools=tools, cancellation_token=cancellation_token)
        if isinstance(result.content, str):
            for word in result.content.split(" "):
                yield word + " "
        yield result

    async def close(self) -> None:
        return None

    def actual_usage(self) -> RequestUsage:
        return self._last_usage

    def total_usage(self) -> RequestUsage:
        return self._total_usage

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:
        return sum(_words(_text_of(m)) for m in messages)

    def remaining_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:
        return max(0, 128_000 - self.count_tokens(messages, tools=tools))

    @property
    def capabilities(self) -> ModelCapabilities:  # type: ignore[override]
        return OFFLINE_MODEL_INFO  # type: ignore[return-value]

    @property
    def model_info(self) -> ModelInfo:
        return OFFLINE_MODEL_INFO

    # --- the team's behaviour -------------------------------------------------

    def _reply(self, messages: list[LLMMessage], tools: set[str]) -> tuple[str | None, str | list[FunctionCall]]:
        task = next(
            (m.content for m in messages if isinstance(m, UserMessage) and m.source == "user" and isinstance(m.content, str)),
            "",
        )
        texts = [_text_of(m) for m in messages if not isinstance(m, SystemMessage)]
        # In a copilot conversation, the newest request is the task at hand.
        task = next((t.split(NEXT_REQUEST, 1)[1] for t in reversed(texts) if NEXT_REQUEST in t), task)
        behaviour = getattr(self, f"_as_{self.agent}", None)
        if behaviour is None:
            return None, f"{self.agent} has nothing to add. TERMINATE"
        return behaviour(task=task, messages=messages, texts=texts, tools=tools)

    def _handoff(self, target: str, tools: set[str], fallback: str) -> list[FunctionCall]:
        name = f"transfer_to_{target}" if f"transfer_to_{target}" in tools else f"transfer_to_{fallback}"
        call_id = hashlib.sha256(f"{self.agent}:{name}".encode()).hexdigest()[:12]
        return [FunctionCall(id=f"call_{call_id}", name=name, arguments="{}")]

    @staticmethod
    def _plan(texts: list[str]) -> list[tuple[str, str]]:
        for text in reversed(texts):
            if "## Plan" in text:
                return [(agent, desc) for _, agent, desc in PLAN_LINE.findall(text)]
        return []

    def _said(self, messages: list[LLMMessage]) -> list[str]:
        """What this agent said before: its own replies, or the same replayed to it from the log."""
        return [
            _text_of(m)
            for m in messages
            if isinstance(m, AssistantMessage | UserMessage) and m.source == self.agent
        ]

    def _as_planner(self, *, task, messages, texts, tools):
        steps = plan_for(task)
        rejected = [m for t in texts if (m := PLAN_REJECTED.search(t))]
        note = "Each step has one owner; control will walk them in order."
        if rejected:
            feedback = re.sub(r"\s+", " ", rejected[-1].group(1) or "").strip()[:200] or "make the plan more thorough"
            # The revision takes the feedback in as a step of its own, before the conclusions.
            agent = "engineer" if re.search(r"\b(code|comput|plot|run|simulat|test)", feedback, re.I) else "researcher"
            steps.insert(len(steps) - 1, (agent, f"Address the person's feedback on the plan: {feedback}"))
            note = f"Revised after the human's feedback: \u201c{feedback}\u201d."
        plan = "\n".join(f"{i}. [{agent}] {desc}" for i, (agent, desc) in enumerate(steps, 1))
        thought = f"## Plan\n\n{plan}\n\n{note}"
        return thought, self._handoff("plan_reviewer", tools, "control")

    def _as_plan_reviewer(self, *, task, messages, texts, tools):
        steps = self._plan(texts)
        thought = (
            f"**Review.** The plan has {len(steps)} steps and covers background, computation and "
            "interpretation. The computational step should save both a table and a figure. Approved."
        )
        return thought, self._handoff("control", tools, "planner")

    def _next_step(self, messages: list[LLMMessage]) -> int:
        """How many steps of the newest plan are behind: announced, skipped, or sent back to be redone."""
        texts = [_text_of(m) for m in messages]
        start = max((i for i, t in enumerate(texts) if "## Plan" in t), default=0)
        behind = 0
        for message, text in zip(messages[start:], texts[start:], strict=True):
            source = getattr(message, "source", "")
            mark = STEP_MARK.search(text)
            if source == self.agent and mark:
                behind = int(mark.group(1))
            elif source == "human" and (decision := STEP_DECISION.search(text)):
                number = int(decision.group(2))
                behind = number if decision.group(1) == "skip" else number - 1
        return behind

    def _as_control(self, *, task, messages, texts, tools):
        steps = self._plan(texts) or plan_for(task)
        done = self._next_step(messages)
        if done >= len(steps):
            return f"All {len(steps)} steps are done. Handing over for the summary.", self._handoff(
                "summarizer", tools, "summarizer"
            )
        agent, desc = steps[done]
        thought = f"**Step {done + 1}/{len(steps)}** — {desc}. Assigned to {agent}."
        return thought, self._handoff(agent, tools, "engineer")

    def _as_researcher(self, *, task, messages, texts, tools):
        step = self._current_step(texts)
        topic = topic_of(task)
        if step <= 1:
            body = (
                f"### Background\n\nThe task asks for: *{topic}*.\n\n"
                "- The signal is modelled as a damped oscillation, `y(x) = exp(-x/τ) cos(ωx)`.\n"
                "- Two quantities matter: the damping scale τ and the frequency ω.\n"
                "- A table of samples and a plot are enough to check the behaviour."
            )
        else:
            outputs = [t for t in texts if "peak amplitude:" in t]
            figures = re.findall(r"peak amplitude: ([-0-9.]+)", outputs[-1]) if outputs else []
            peak = figures[-1] if figures else "unknown"
            body = (
                "### Interpretation\n\n"
                f"The computed peak amplitude is **{peak}**; the envelope decays monotonically, "
                "as expected for a damped system. The saved table and figure support this."
            )
        return body, self._handoff("control", tools, "summarizer")

    def _as_engineer(self, *, task, messages, texts, tools):
        step = self._current_step(texts) or 1
        since_step = texts[max((i for i, t in enumerate(texts) if STEP_MARK.search(t)), default=0) :]
        failures = [t for t in since_step if t.startswith("exitcode:") and "execution failed" in t]
        code = code_for(task, step)
        if since_step and CODE_DENIED in since_step[-1]:
            thought = "Understood: the code will not be run. Handing back without a result for this step."
            return thought, self._handoff("control" if self._plan(texts) else "summarizer", tools, "summarizer")
        if failures:
            errors = failures[-1].split("Errors:\n", 1)[-1].split("\nFiles written:", 1)[0]
            error = (errors.strip().splitlines() or ["an error"])[-1]
            thought = f"The previous attempt failed ({error}). Fixed: the helper is defined before use.\n\n```python\n{code}```"
        elif RETRY_WORD.search(task):
            # Asked to show error recovery: the first attempt uses a name it never defines.
            thought = f"Here is the code for step {step}.\n\n```python\n{code.replace('peak = max(ys)', 'peak = peak_of(ys)')}```"
        else:
            thought = f"Here is the code for step {step}. It writes a CSV table and a PNG plot.\n\n```python\n{code}```"
        return thought, self._handoff("executor", tools, "executor")

    def _as_executor(self, *, task, messages, texts, tools):
        last_code = max((i for i, t in enumerate(texts) if CODE_BLOCK.search(t)), default=None)
        if last_code is None:
            return "There is no code to run.", self._handoff("control", tools, "summarizer")
        reports = [t for t in texts[last_code + 1 :] if t.startswith("exitcode:") or "time limit exceeded" in t]
        if reports:
            ok = "execution succeeded" in reports[-1]
            thought = ("The code ran successfully." if ok else "The code failed; see the errors above.") + (
                "\n\n" + reports[-1].splitlines()[0]
            )
            if not ok:
                return thought, self._handoff("engineer", tools, "summarizer")  # to be fixed and run again
            # After a planned step, back to control; after a one-shot answer, on to the summary.
            return thought, self._handoff("control" if self._plan(texts) else "summarizer", tools, "summarizer")
        code = CODE_BLOCK.findall(texts[last_code])[-1]
        call_id = hashlib.sha256(code.encode()).hexdigest()[:12]
        return None, [FunctionCall(id=f"call_{call_id}", name="execute_code", arguments=json.dumps({"code": code}))]

    def _as_copilot_control(self, *, task, messages, texts, tools):
        # A request that asks for several things, or is long, gets a plan; a
        # single focused request gets a direct, one-shot answer.
        words = task.split()
        planned = len(words) > 25 or bool(re.search(r"\b(plan|steps|and then|pipeline|analysis)\b", task, re.I))
        if planned:
            thought = "**Route: planning.** The request has several parts, so the team will agree on a plan first."
            return thought, self._invoke("planning", tools)
        thought = "**Route: one shot.** The request is focused; the engineer will answer it directly."
        return thought, self._invoke("one_shot", tools)

    def _invoke(self, phase: str, tools: set[str]) -> list[FunctionCall]:
        name = f"invoke_{phase}_phase"
        if name not in tools:
            raise ValueError(f"{self.agent} cannot invoke the {phase} phase here (tools: {sorted(tools)})")
        call_id = hashlib.sha256(f"{self.agent}:{name}".encode()).hexdigest()[:12]
        return [FunctionCall(id=f"call_{call_id}", name=name, arguments="{}")]

    def _as_idea_maker(self, *, task, messages, texts, tools):
        topic = topic_of(task)
        if not self._said(messages):
            ideas = [
                f"Measure how {topic} changes with the damping scale, using a grid of simulations",
                f"Compare {topic} against a simple analytic approximation and quantify the error",
                f"Look for a signature of {topic} in public survey data",
            ]
            body = "## Ideas\n\n" + "\n".join(f"{i}. {idea}" for i, idea in enumerate(ideas, 1))
        else:
            body = (
                "## Refined ideas\n\n1. Keep idea 2, scoped to one analytic approximation and one error metric.\n"
                "2. Merge ideas 1 and 3: a small simulation grid checked against one public data set."
            )
        return body, self._handoff("idea_hater", tools, "summarizer")

    def _as_idea_hater(self, *, task, messages, texts, tools):
        if not self._said(messages):
            body = (
                "## Critique\n\n- Idea 1 is costly: a grid of simulations needs a clear question first.\n"
                "- Idea 2 is cheap and testable.\n- Idea 3 depends on data access we may not have.\n\nPlease refine."
            )
            return body, self._handoff("idea_maker", tools, "summarizer")
        body = "**Selected:** refined idea 1 — it is feasible now and gives a number that can be checked."
        return body, self._handoff("summarizer", tools, "summarizer")

    def _as_summarizer(self, *, task, messages, texts, tools):
        steps = self._plan(texts)
        executed = sum(1 for t in texts if t.startswith("exitcode: 0"))
        lines = [f"## Summary\n\nTask: *{topic_of(task)}*."]
        selected = [t for t in texts if "**Selected:**" in t]
        if selected:
            lines.append(selected[-1])
        if steps:
            lines.append(f"The team followed a {len(steps)}-step plan.")
        if executed:
            lines.append(f"Code was executed {executed} time(s) successfully; results and plots were saved.")
        return "\n\n".join(lines), self._handoff("terminator", tools, "terminator")

    def _as_terminator(self, *, task, messages, texts, tools):
        return None, "The work is complete. TERMINATE"

    @staticmethod
    def _current_step(texts: list[str]) -> int:
        for text in reversed(texts):
            match = STEP_MARK.search(text)
            if match:
                return int(match.group(1))
        return 0
