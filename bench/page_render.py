#!/usr/bin/env python
"""Session page render time: a session of 100 events against one of 10,000.

The server renders the session page (full middleware stack, login, CSP, the
glance, the approval cards and the transcript window) through Django's test
client, for a session of SMALL events and one of LARGE events, in the same
run and the same database. Events are a realistic mix: agent messages with
markdown and a code block, tool calls with code, tool outputs, handoffs, plan
and step events. The baseline is the SMALL session; the goal is that the
LARGE one opens as fast (ratio close to 1x), because the page shows the newest
window only and loads older events as the reader scrolls up.

Also timed, for comparison: rendering every event of the LARGE session on one
page (what the page did before it was windowed), and one "older events" page.

    .venv/bin/python bench/page_render.py              # 100 vs 10,000, SQLite
    .venv/bin/python bench/page_render.py --quick      # fewer repetitions
    DATABASE_URL=postgres://... .venv/bin/python bench/page_render.py   # on PostgreSQL (writes a bench user)

Not a test: it prints a table and exits 1 only if the LARGE page is over 2x.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.support import headline  # noqa: E402 - needs ROOT on the path

MESSAGE = (
    "Here is the next part of the analysis of the **damped acoustic mode**.\n\n"
    "- the amplitude falls as `exp(-k^2/k_D^2)`\n- the phase shifts with the baryon load\n\n"
    "```python\nimport numpy as np\nk = np.linspace(0.01, 0.3, 200)\nprint(np.exp(-(k / 0.14) ** 2).sum())\n```\n"
)
CODE = "import numpy as np\nx = np.linspace(0, 10, 500)\ny = np.exp(-0.3 * x) * np.cos(2 * x)\nprint(y.max())\n"


def _events(session, n: int):
    from sessions.models import Event

    rows = []
    for seq in range(1, n + 1):
        kind = ("message", "tool_call", "tool_result", "handoff", "message", "step")[seq % 6]
        data: dict = {}
        content = MESSAGE
        agent = "engineer"
        if kind == "tool_call":
            import json

            content, data = "execute_code", {"calls": [{"id": f"c{seq}", "name": "execute_code", "arguments": json.dumps({"code": CODE})}]}
        elif kind == "tool_result":
            agent, content, data = "executor", "execution succeeded\n0.999\n", {"name": "execute_code", "call_id": f"c{seq}"}
        elif kind == "handoff":
            content, data = "executor", {"target": "executor"}
        elif kind == "step":
            agent, content, data = "control", "step", {"step": seq % 5 + 1, "of": 5}
        else:
            data = {"role": "engineer", "model": "offline"}
        rows.append(Event(session=session, seq=seq, kind=kind, agent=agent, content=content, data=data, prompt_tokens=100, completion_tokens=40))
    Event.objects.bulk_create(rows, batch_size=1000)
    type(session).objects.filter(pk=session.pk).update(last_seq=n, prompt_tokens=100 * n, completion_tokens=40 * n, usage={"engineer": {"prompt": 100 * n, "completion": 40 * n, "cost": 0.0}})


def _time(fn, repeat: int) -> list[float]:
    fn()  # warm-up: templates compiled, connection open
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeat = 8 if args.quick else args.repeat

    tmp = Path(tempfile.mkdtemp(prefix="cmbagent-render-"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cmbagent_site.settings")
    os.environ["CMBAGENT_VAR_DIR"] = str(tmp)
    os.environ.setdefault("SECRET_KEY", "bench-only")
    os.environ["EMBEDDED_WORKER"] = "0"
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.template.loader import render_to_string
    from django.test import Client
    from django.test.utils import setup_test_environment

    setup_test_environment()  # the test client needs it (and it swaps in a fast password hasher's absence: fine)
    settings.ALLOWED_HOSTS = ["*"]
    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model

    from sessions import selectors, services

    user, _ = get_user_model().objects.get_or_create(username=f"bench-render-{os.getpid()}")
    client = Client()
    client.force_login(user)
    sessions = {}
    for label, n in (("small", args.small), ("large", args.large)):
        session = services.session_start(owner=user, task=f"Bench page of {n} events", mode="planning_and_control")
        from sessions.models import Event

        Event.objects.filter(session=session).delete()
        _events(session, n)
        sessions[label] = session

    def page(label):
        def get():
            response = client.get(sessions[label].get_absolute_url())
            assert response.status_code == 200, response.status_code
            return response

        return get

    def everything():
        session = type(sessions["large"]).objects.select_related("state").get(pk=sessions["large"].pk)
        events = selectors.transcript(session.pk)
        render_to_string("sessions/older.html", {"session": session, "events": events, "first_seq": 1})

    def older():
        response = client.get(f"{sessions['large'].get_absolute_url()}events/?before={args.large // 2}")
        assert response.status_code == 200

    results = [
        (f"page, {args.small:,} events", _time(page("small"), repeat), len(page("small")().content)),
        (f"page, {args.large:,} events", _time(page("large"), repeat), len(page("large")().content)),
        (f"older window of {settings.TRANSCRIPT_WINDOW}", _time(older, repeat), 0),
        (f"all {args.large:,} events, unwindowed", _time(everything, max(3, repeat // 5)), 0),
    ]
    base = statistics.median(results[0][1])
    engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    print(f"Session page render ({engine}, window {settings.TRANSCRIPT_WINDOW}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(f"{'what':<36}{'runs':>5}{'p50 ms':>10}{'p90 ms':>10}{'ratio':>9}{'KiB':>8}")
    for what, times, size in results:
        times = sorted(times)
        p50, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
        print(f"{what:<36}{len(times):>5}{p50:>10.1f}{p90:>10.1f}{p50 / base:>8.2f}x{(size / 1024 if size else 0):>8.0f}")
    ratio = statistics.median(results[1][1]) / base
    print(f"\n{args.large:,} vs {args.small:,} events: {ratio:.2f}x (goal: as fast, within 2x) -> {'met' if ratio <= 2 else 'NOT met'}")
    unwindowed = statistics.median(results[3][1]) / base
    headline(
        "page_render.py", f"the session page of {args.large:,} events vs {args.small:,} ({engine})",
        f"{ratio:.2f}x (p50 {statistics.median(results[1][1]):.0f} ms vs {base:.0f} ms); unwindowed it would be {unwindowed:.0f}x",
        "<= 2x", "met" if ratio <= 2 else "MISSED",
    )
    for session in sessions.values():
        session.delete()
    return 0 if ratio <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
