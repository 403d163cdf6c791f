#!/usr/bin/env python
"""Engine overhead: the SwarmOrchestrator against a bare autogen Swarm.

One scripted two-agent conversation (idea_maker and idea_hater handing off to
each other, every reply a 200-byte thought plus a ``transfer_to_<other>``
call), replayed by autogen-ext's ReplayChatCompletionClient, goes through:

* bare:       ``Swarm(agents, max_turns=N).run_stream(task=...)``, iterated and
              nothing else; the agents come from the app's own
              ``build_agents`` with the idea_generation roster, so both sides
              run identical AssistantAgents;
* engine:     ``SwarmOrchestrator(mode="idea_generation", max_turns=N).run()``
              with state capture at every event: for each ``(event, checkpoint)``
              pair, ``json.dumps(event.to_dict())`` and ``json.dumps(checkpoint)``,
              the serialisation the worker writes (no database);
* engine_tail: engine, plus the 50-message conversation tail that the worker
              also saves with every event, serialised each time (not part of
              the target; shows what that tail costs);
* save_state: the bare Swarm plus ``json.dumps(await team.save_state())`` after
              every chat message: the whole-state checkpoint the design rejects.

at N = 50 and N = 1,000 messages (agent turns), and prints the cost per event
and the ratio to bare (target: engine within 1.3x of bare at both lengths).
See bench/README.md. No network, no database; about a minute.
The exit status is 1 if the target is missed.

    .venv/bin/python bench/engine_overhead.py
    .venv/bin/python bench/engine_overhead.py --quick     # fewer repetitions
    .venv/bin/python bench/engine_overhead.py --profile   # + cProfile of both at the longest length
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import gc
import io
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from autogen_agentchat.base import TaskResult  # noqa: E402

from bench.support import headline  # noqa: E402
from autogen_agentchat.messages import BaseChatMessage, HandoffMessage, ThoughtEvent  # noqa: E402
from autogen_agentchat.teams import Swarm  # noqa: E402
from autogen_core import FunctionCall  # noqa: E402
from autogen_core.models import ChatCompletionClient, CreateResult, RequestUsage  # noqa: E402
from autogen_ext.models.replay import ReplayChatCompletionClient  # noqa: E402

from orchestrator.engine.agents import build_agents  # noqa: E402
from orchestrator.engine.events import EventKind  # noqa: E402
from orchestrator.engine.modes import Mode  # noqa: E402
from orchestrator.engine.offline import OFFLINE_MODEL_INFO  # noqa: E402
from orchestrator.engine.swarm import MAX_ROUNDS_REACHED, SwarmOrchestrator  # noqa: E402

MODE = Mode.IDEA_GENERATION
SPEAKERS = ("idea_maker", "idea_hater")  # the first two of the roster; they hand off to each other
TASK = "Propose research ideas on the CMB lensing power spectrum and keep the strongest."
MESSAGE_BYTES = 200
TARGET = 1.3
LONG = 200  # conversations longer than this get fewer repetitions
VARIANTS = ("bare", "engine", "engine_tail", "save_state")
# As orchestrator/worker.py (TAIL_KINDS) and sessions/services.py (HISTORY_TAIL), copied
# because importing either needs Django: the worker also saves the last 50 messages with
# every event (SessionState.conversation_history).
TAIL_KINDS = {EventKind.TASK, EventKind.MESSAGE, EventKind.HANDOFF, EventKind.TOOL_CALL, EventKind.TOOL_RESULT}
HISTORY_TAIL = 50

ClientFor = Callable[[str], ChatCompletionClient]
Outcome = tuple[int, int, int, float]  # autogen items, engine events, bytes serialised, seconds saving


# --- the scripted conversation -------------------------------------------------


def thought(agent: str, turn: int) -> str:
    """A 200-byte message, different at every turn (so nothing can be cached)."""
    head = f"[{agent} turn {turn}] "
    body = "The idea holds if the lensing reconstruction noise stays below the signal on large scales; "
    text = head + body * 3
    return text[:MESSAGE_BYTES]


def script(turns: int) -> dict[str, list[CreateResult]]:
    """Each speaker's replies for a conversation of ``turns`` agent turns."""
    usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
    replies: dict[str, list[CreateResult]] = {name: [] for name in MODE.roster}
    for turn in range(turns + 2):  # one spare reply each: the run must stop on max_turns, not run dry
        agent = SPEAKERS[turn % 2]
        other = SPEAKERS[(turn + 1) % 2]
        replies[agent].append(
            CreateResult(
                finish_reason="function_calls",
                content=[FunctionCall(id=f"call_{turn}", name=f"transfer_to_{other}", arguments="{}")],
                usage=usage,
                cached=False,
                thought=thought(agent, turn),
            )
        )
    return replies


def clients_for(replies: dict[str, list[CreateResult]]) -> ClientFor:
    """Fresh replay clients (built before the clock starts), handed out by agent name."""
    clients = {name: ReplayChatCompletionClient(r, model_info=OFFLINE_MODEL_INFO) for name, r in replies.items()}
    return clients.__getitem__


# --- the variants ------------------------------------------------------------------
# Each returns an Outcome. The clock covers building the agents and the team as well
# as the run, on every side (the orchestrator builds its team inside run()); the replay
# clients are built before it starts.


async def run_bare(turns: int, client_for: ClientFor, work_dir: Path) -> Outcome:
    agents = build_agents(MODE.roster, client_for=client_for, tools={}, stream=False)
    team = Swarm(agents, max_turns=turns)
    items = 0
    async for item in team.run_stream(task=TASK):
        if not isinstance(item, TaskResult):
            items += 1
    return items, 0, 0, 0.0


async def run_save_state(turns: int, client_for: ClientFor, work_dir: Path, *, stride: int = 1) -> Outcome:
    """Also returns the seconds spent saving. With ``stride`` k > 1 only every
    k-th chat message is saved (a long run saved at every message takes over a
    minute); the caller then extrapolates the saving time by k."""
    agents = build_agents(MODE.roster, client_for=client_for, tools={}, stream=False)
    team = Swarm(agents, max_turns=turns)
    items = size = messages = 0
    saving = 0.0
    async for item in team.run_stream(task=TASK):
        if isinstance(item, TaskResult):
            continue
        items += 1
        if isinstance(item, BaseChatMessage):
            messages += 1
            if messages % stride == 0:
                start = time.perf_counter()
                size += len(json.dumps(await team.save_state()))
                saving += time.perf_counter() - start
    return items, 0, size, saving


async def run_engine(turns: int, client_for: ClientFor, work_dir: Path) -> Outcome:
    engine = SwarmOrchestrator(task=TASK, mode=MODE, work_dir=work_dir, client_for=client_for, max_turns=turns)
    events = size = 0
    async for event, checkpoint in engine.run():
        # What the worker serialises for each event (Event row + state checkpoint), minus the database.
        size += len(json.dumps(event.to_dict())) + len(json.dumps(checkpoint))
        events += 1
    if engine.outcome is None or engine.outcome.reason != MAX_ROUNDS_REACHED:
        raise SystemExit(f"engine run ended unexpectedly: {engine.outcome}")
    return 4 * turns + 1, events, size, 0.0  # autogen items: the same conversation as bare (checked in verify())


async def run_engine_tail(turns: int, client_for: ClientFor, work_dir: Path) -> Outcome:
    """run_engine, plus the conversation tail the worker saves with every event."""
    engine = SwarmOrchestrator(task=TASK, mode=MODE, work_dir=work_dir, client_for=client_for, max_turns=turns)
    tail: collections.deque[dict] = collections.deque(maxlen=HISTORY_TAIL)
    events = size = 0
    async for event, checkpoint in engine.run():
        if event.kind in TAIL_KINDS:
            tail.append({"agent": event.agent, "kind": str(event.kind), "content": event.content[:2000]})
        size += len(json.dumps(event.to_dict())) + len(json.dumps(checkpoint)) + len(json.dumps(list(tail)))
        events += 1
    if engine.outcome is None or engine.outcome.reason != MAX_ROUNDS_REACHED:
        raise SystemExit(f"engine run ended unexpectedly: {engine.outcome}")
    return 4 * turns + 1, events, size, 0.0


RUNNERS = {"bare": run_bare, "engine": run_engine, "engine_tail": run_engine_tail, "save_state": run_save_state}


# --- measuring ---------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    items: int
    events: int
    size: int
    extrapolated: bool = False


@dataclass
class Series:
    variant: str
    turns: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def best(self) -> float:
        return min(s.seconds for s in self.samples)


async def timed(variant: str, turns: int, work_dir: Path, stride: int = 1) -> Sample:
    client_for = clients_for(script(turns))
    gc.collect()
    start = time.perf_counter()
    if variant == "save_state":
        items, events, size, saving = await run_save_state(turns, client_for, work_dir, stride=stride)
    else:
        items, events, size, saving = await RUNNERS[variant](turns, client_for, work_dir)
    seconds = time.perf_counter() - start
    if stride == 1:
        return Sample(seconds, items, events, size)
    # Saving costs grow linearly along the run, so every k-th message is a fair
    # sample: scale the time spent saving (and the bytes) up to every message.
    messages = turns + 1
    scale = messages / (messages // stride)
    return Sample(seconds - saving + saving * scale, items, events, round(size * scale), extrapolated=True)


async def verify(turns: int, work_dir: Path) -> None:
    """Both sides play the same conversation: same speakers, same texts, same handoffs, same count."""
    agents = build_agents(MODE.roster, client_for=clients_for(script(turns)), tools={}, stream=False)
    bare: list[tuple[str, str]] = []
    items = 0
    async for item in Swarm(agents, max_turns=turns).run_stream(task=TASK):
        if isinstance(item, TaskResult):
            continue
        items += 1
        if isinstance(item, ThoughtEvent):
            bare.append((item.source, item.content))
        elif isinstance(item, HandoffMessage):
            bare.append((item.source, "->" + item.target))
    client_for = clients_for(script(turns))
    engine = SwarmOrchestrator(task=TASK, mode=MODE, work_dir=work_dir, client_for=client_for, max_turns=turns)
    seen: list[tuple[str, str]] = []
    async for event, _ in engine.run():
        if event.kind == EventKind.MESSAGE:
            seen.append((event.agent, event.content))
        elif event.kind == EventKind.HANDOFF:
            seen.append((event.agent, "->" + event.content))
    if items != 4 * turns + 1 or seen != bare or len(bare) != 2 * turns:
        raise SystemExit(f"the two sides did not play the same conversation at {turns} turns ({items} items)")


def reps_for(turns: int, variant: str, args: argparse.Namespace) -> int:
    long = turns > LONG
    if variant == "save_state":
        return args.save_state_reps_long if long else args.reps
    return args.reps_long if long else args.reps


async def measure(args: argparse.Namespace, work_dir: Path) -> list[Series]:
    for turns in args.lengths:
        await verify(turns, work_dir)
    for variant in VARIANTS:  # warm-up: imports, caches, pydantic validators; not reported
        await timed(variant, min(args.lengths), work_dir)
    results: list[Series] = []
    for turns in args.lengths:
        series = {v: Series(v, turns) for v in VARIANTS}
        rounds = max(reps_for(turns, v, args) for v in VARIANTS)
        for r in range(rounds):
            # Rotate the order every round, so drift on the machine falls on every variant alike.
            k = r % len(VARIANTS)
            order = VARIANTS[k:] + VARIANTS[:k]
            for variant in order:
                if len(series[variant].samples) < reps_for(turns, variant, args):
                    stride = args.save_state_stride if variant == "save_state" and turns > LONG else 1
                    series[variant].samples.append(await timed(variant, turns, work_dir, stride))
        results.extend(series.values())
    return results


async def profile(turns: int, work_dir: Path, top: int) -> str:
    """cProfile of one bare and one engine run, and the engine's own functions."""
    out = io.StringIO()
    totals = {}
    for variant in ("bare", "engine"):
        client_for = clients_for(script(turns))
        gc.collect()
        prof = cProfile.Profile()
        prof.enable()
        await RUNNERS[variant](turns, client_for, work_dir)
        prof.disable()
        stats = pstats.Stats(prof, stream=out)
        totals[variant] = stats.total_tt
        out.write(f"\n=== cProfile: {variant}, {turns} turns, sorted by own time ===\n")
        stats.sort_stats("tottime").print_stats(top)
        if variant == "engine":
            # What the orchestrator adds on top of autogen: its translation and
            # checkpoint code, and the serialisation done for every event.
            out.write(f"\n=== cProfile: engine, {turns} turns, the engine's own code and serialisation ===\n")
            stats.sort_stats("cumulative").print_stats(r"orchestrator/engine|engine_overhead|json/|dataclasses", top)
    out.write(
        f"\nprofiled totals: bare {totals['bare']:.3f} s, engine {totals['engine']:.3f} s "
        f"({totals['engine'] / totals['bare']:.2f}x; cProfile inflates both)\n"
    )
    return out.getvalue()


# --- report ------------------------------------------------------------------------


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("autogen-agentchat", "autogen-core", "autogen-ext", "pydantic")
    )
    return (
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu or platform.machine()}, "
        f"load average {load}\n"
        f"python {platform.python_version()}, {versions}"
    )


def report(results: list[Series]) -> tuple[str, bool]:
    lines = [
        "One run = one conversation of N agent turns; each turn is a 200-byte thought + a handoff, 4 autogen items.",
        "events: autogen items from run_stream (4N+1, the same conversation for every variant), so us/event and",
        "events/s compare like with like. us/eng.ev: per event the orchestrator yields (2N+2). extra us/ev: the",
        "variant's median minus bare's, per event. ratio: median / bare median (best ratio: best / best).",
        "",
        f"{'turns':>5}  {'variant':<11} {'runs':>4} {'median ms':>10} {'best ms':>9} {'events/s':>9} "
        f"{'us/event':>9} {'extra us/ev':>11} {'us/eng.ev':>9} {'ratio':>7} {'best ratio':>10} {'MB dumped':>9}",
    ]
    met = True
    results = [s for s in results if s.samples]
    by_key = {(s.turns, s.variant): s for s in results}
    for s in results:
        bare = by_key[(s.turns, "bare")]
        sample = s.samples[0]
        ratio = s.median / bare.median
        if s.variant == "engine" and ratio > TARGET:
            met = False
        name = s.variant + ("*" if sample.extrapolated else "")
        eng = f"{s.median / sample.events * 1e6:9.1f}" if sample.events else f"{'':>9}"
        extra = f"{(s.median - bare.median) / sample.items * 1e6:11.1f}" if s.variant != "bare" else f"{'':>11}"
        lines.append(
            f"{s.turns:>5}  {name:<11} {len(s.samples):>4} {s.median * 1e3:>10.1f} {s.best * 1e3:>9.1f} "
            f"{sample.items / s.median:>9.0f} {s.median / sample.items * 1e6:>9.1f} {extra} {eng} "
            f"{ratio:>6.2f}x {s.best / bare.best:>9.2f}x {sample.size / 1e6:>9.2f}"
        )
    if any(x.extrapolated for s in results for x in s.samples):
        lines.append(
            "* save_state timed at every k-th chat message only (--save-state-stride), "
            "its saving time and bytes scaled by k."
        )
    lines.append("")
    for turns in sorted({s.turns for s in results}):
        ratio = by_key[(turns, "engine")].median / by_key[(turns, "bare")].median
        verdict = "met" if ratio <= TARGET else "NOT met"
        lines.append(f"{turns:>5} turns: engine / bare = {ratio:.2f}x (median)   target <= {TARGET}x: {verdict}")
    return "\n".join(lines), met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="50,1000", help="conversation lengths in agent turns (default 50,1000)")
    parser.add_argument("--reps", type=int, default=9, help="runs per variant at short lengths (<= 200 turns)")
    parser.add_argument("--reps-long", type=int, default=5, help="runs of bare and engine at long lengths")
    parser.add_argument("--save-state-reps-long", type=int, default=1, help="runs of save_state at long lengths")
    parser.add_argument(
        "--save-state-stride",
        type=int,
        default=10,
        help="at long lengths save_state times every k-th message and scales up (1: all, over a minute at 1,000)",
    )
    parser.add_argument("--quick", action="store_true", help="3 short runs, 1 long run per variant")
    parser.add_argument("--profile", action="store_true", help="also cProfile bare and engine at the longest length")
    parser.add_argument("--top", type=int, default=25, help="rows of each cProfile listing")
    parser.add_argument("--json", metavar="PATH", help="write every sample to PATH")
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        args.reps, args.reps_long, args.save_state_reps_long = 3, 1, min(args.save_state_reps_long, 1)

    # The replay client logs a warning for every non-string message it "tokenizes"
    # (the agents' own tool calls in their contexts): quadratic noise on stderr.
    logging.getLogger("autogen_core").setLevel(logging.ERROR)
    logging.getLogger("autogen_agentchat").setLevel(logging.ERROR)

    load_before = os.getloadavg()[0]
    print(machine())
    print(f"mode {MODE} (speakers {', '.join(SPEAKERS)}), {MESSAGE_BYTES}-byte messages, replay client, one loop")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="engine-overhead-") as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
        table, met = report(results)
        print()
        print(table)
        by_key = {(s.turns, s.variant): s for s in results if s.samples}
        ratios = ", ".join(
            f"{turns} turns {by_key[(turns, 'engine')].median / by_key[(turns, 'bare')].median:.2f}x"
            for turns in sorted({t for t, _ in by_key})
        )
        headline(
            "engine_overhead.py", "the orchestrator (checkpoint per event) vs bare autogen Swarm, same conversation",
            f"engine / bare median: {ratios}", f"<= {TARGET}x", "met" if met else "MISSED",
        )
        if args.profile:
            print(asyncio.run(profile(max(args.lengths), Path(tmp), args.top)))
    load = os.getloadavg()
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in load)}; total {time.perf_counter() - started:.0f} s")
    cpus = len(os.sched_getaffinity(0))
    # This script itself keeps one CPU busy, so it adds about 1 to the load average.
    if load_before > 0.5 * cpus or load[0] > 1 + 0.25 * cpus:
        print("NOTE: the machine was busy with other work; medians may be skewed, compare the best ratios or rerun.")
    if args.json:
        rows = [{"variant": s.variant, "turns": s.turns, "samples": [vars(x) for x in s.samples]} for s in results]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
