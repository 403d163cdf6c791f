#!/usr/bin/env python
"""Worker memory over a long run: RSS of the worker and of the run's process, per 1,000 events.

A replayed idea_generation conversation (idea_maker and idea_hater handing off
to each other; each turn is a message and a handoff, two events) of N events
(default 10,000) runs through the real worker: the run's engine in its child
process, every event written with its checkpoint to a throwaway SQLite
database. The worker's RSS is read at every 1,000th event and compared with
its RSS after the first 1,000 (the baseline, measured in the same run); the
goal is flat (end / baseline close to 1). The run's process is reported too:
it holds autogen's own message thread, which grows with the conversation.

    .venv/bin/python bench/worker_memory.py                 # 10,000 events
    .venv/bin/python bench/worker_memory.py --events 2000   # quicker
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.support import headline, rss_mib  # noqa: E402 - needs ROOT on the path


def script(turns: int) -> dict:
    def reply(agent: str, other: str, n: int) -> dict:
        return {"thought": f"{agent} turn {n}: " + "x" * 180, "calls": [{"name": f"transfer_to_{other}"}]}

    half = turns // 2
    return {
        "idea_maker": [reply("idea_maker", "idea_hater", n) for n in range(half)],
        "idea_hater": [reply("idea_hater", "idea_maker", n) for n in range(half - 1)]
        + [{"thought": "Enough.", "calls": [{"name": "transfer_to_summarizer"}]}],
        "summarizer": [{"thought": "Summary.", "calls": [{"name": "transfer_to_terminator"}]}],
        "terminator": ["TERMINATE"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cmbagent-mem-"))
    path = tmp / "script.json"
    path.write_text(json.dumps(script(args.events // 2)))
    os.environ.update(
        DJANGO_SETTINGS_MODULE="cmbagent_site.settings",
        CMBAGENT_VAR_DIR=str(tmp),
        CMBAGENT_REPLAY_SCRIPT=str(path),
    )
    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from orchestrator.worker import RunWorker
    from sessions import services

    owner = User.objects.create_user("bench")
    session = services.session_start(owner=owner, task="Ideas for a long argument", mode="idea_generation", model_provider="replay")
    worker = RunWorker(worker_id="bench")
    run = services.run_claim(worker_id=worker.worker_id, lease_seconds=60)
    samples: list[tuple[int, float, float, float]] = []
    started = time.perf_counter()

    def observe(row) -> None:
        if row.seq % 1000 == 0:
            child = next(iter(worker.children.values()), None)
            samples.append((row.seq, time.perf_counter() - started, rss_mib(os.getpid()), rss_mib(child.pid) if child else float("nan")))
            print(f"  {row.seq:>6} events  {samples[-1][1]:6.1f} s  worker {samples[-1][2]:7.1f} MiB  run process {samples[-1][3]:7.1f} MiB", flush=True)

    print(f"worker memory: a replayed run of {args.events:,} events (SQLite, in-memory layer)")
    asyncio.run(worker.execute(run, observer=observe))
    session.refresh_from_db()
    print(f"status: {session.status}, {session.last_seq:,} events")
    if len(samples) < 2:
        print("too few samples")
        return 1
    base, end = samples[0], samples[-1]
    print(
        f"worker RSS: {base[2]:.1f} MiB at {base[0]:,} events (baseline) -> {end[2]:.1f} MiB at {end[0]:,} "
        f"= {end[2] / base[2]:.2f}x baseline"
    )
    headline(
        "worker_memory.py", f"worker RSS over a replayed run of {session.last_seq:,} events",
        f"{base[2]:.1f} -> {end[2]:.1f} MiB ({end[2] / base[2]:.2f}x from {base[0]:,} to {end[0]:,} events)",
        "flat", "met" if end[2] / base[2] <= 1.1 else "MISSED",
    )
    alive = [s for s in samples if s[3] == s[3]]  # the run's process may be gone at the last sample
    if len(alive) >= 2:
        print(
            f"run process RSS: {alive[0][3]:.1f} MiB at {alive[0][0]:,} -> {alive[-1][3]:.1f} MiB at {alive[-1][0]:,} "
            f"= {alive[-1][3] / alive[0][3]:.2f}x (autogen's own message thread lives here)"
        )
    return 0 if session.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
