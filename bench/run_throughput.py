#!/usr/bin/env python
"""Run throughput: Start -> first agent fragment, and delivered events per second.

For 1, 10 and 50 concurrent runs of a two-agent replay script (idea_maker and
idea_hater handing off to each other, 50 messages of 200 bytes, the run
pausing on its 50-turn budget), on the embedded default (``manage.py serve``:
Daphne with the run worker inside, SQLite, in-memory channel layer) and on
PostgreSQL + Redis (``manage.py serve --no-worker`` plus ``runworker
orchestrator`` processes), the script measures:

* Start -> first agent fragment: from just before the new-session form's POST
  (the Start button) to the arrival, at a WebSocket client on the session's
  socket, of the first fragment holding an agent message. The client connects
  as soon as the POST's redirect names the session, and says
  ``{"type": "hello", "after": 0}``; the fragment comes by catch-up or push,
  whichever first;
* delivered events per second: every event of every run received by the
  clients, divided by the time from the first Start to the last delivery;
* that no event was lost, duplicated or reordered (each client's arrivals are
  compared with the database afterwards), and that every run played the
  script;
* RSS of the server, the worker(s) and the runs' processes, and memory per
  concurrent run; where the CPU went.

The baseline, measured in the same run, is the engine-only floor: the same
runs, at the same concurrency, as bare ``python -m orchestrator.engine.process``
children whose events are read and dropped (no database, no channel layer, no
socket). See bench/README.md.

    .venv/bin/python bench/run_throughput.py            # full run, 3.5-6 min (each scenario has a time limit)
    .venv/bin/python bench/run_throughput.py --quick    # 1 and 10 runs only, about 70 s on a quiet machine

PostgreSQL (postgres://postgres@127.0.0.1:5432, override with BENCH_PG_ADMIN_URL)
and Redis (REDIS_URL, default redis://127.0.0.1:6379/0) are used for the second
backend; a database of its own is created and dropped, and the Redis keys carry
a prefix of their own. Without them that backend is skipped with a message.
The exit status is 1 if any event was lost, duplicated or reordered, or a run
did not play its script.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.support import (  # noqa: E402 - needs ROOT on the path
    ARTICLE_RE, BADGE_RE, HOST, LoggedProcess, PipeHelper, SessionSocket, all_pids, children_of, cpu_s, csrf_token,
    free_port, headline, http, launchers_of, login_users, machine_busy_s, migrate, on_cpu_ms, pct, pg_database,
    pg_settings, pids_matching, print_table, proc_stat, rss_mib, runs_cpu_s, serve_django_requests, versions,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PG_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
SPEAKERS = ("idea_maker", "idea_hater")
MODE = "idea_generation"
END_STATUSES = {"paused", "completed", "failed", "cancelled", "waiting_approval", "suspended"}
TURN_RE = re.compile(r"turn (\d+):")


# --- the plan ------------------------------------------------------------------


@dataclass
class Plan:
    concurrency: tuple[int, ...] = (1, 10, 50)
    single_reps: int = 5  # the 1-run scenario runs this many times, one after another
    multi_rounds: int = 1  # each N-run scenario runs this many times
    messages: int = 50
    message_bytes: int = 200
    workers: int = 2  # runworker processes on PostgreSQL + Redis
    floor: bool = True
    py_spy: str = ""  # --profile: py-spy's path
    warmup: int = 2  # runs, one after another, before the first reported scenario of each backend

    @classmethod
    def quick(cls) -> Plan:
        return cls(concurrency=(1, 10), single_reps=3, warmup=1)


def message(agent: str, turn: int, size: int) -> str:
    """A message of exactly ``size`` bytes whose turn number the client can read back from the fragment."""
    head = f"{agent} turn {turn:03d}: "
    body = "The idea holds if the lensing reconstruction noise stays below the signal on large scales; "
    return (head + body * (size // len(body) + 2))[:size]


def replay_script(messages: int, size: int) -> dict:
    """Two agents handing off to each other; one spare reply each, since the run stops on its budget."""
    replies: dict[str, list] = {name: [] for name in SPEAKERS}
    for turn in range(messages + 2):
        agent, other = SPEAKERS[turn % 2], SPEAKERS[(turn + 1) % 2]
        replies[agent].append({"thought": message(agent, turn, size), "calls": [{"name": f"transfer_to_{other}"}]})
    return replies


# --- /proc -----------------------------------------------------------------------


class Sampler:
    """Peaks of RSS of the server, the workers and the runs' processes (children of the workers)."""

    def __init__(self, server: int | None, workers: list[int], interval: float = 0.2) -> None:
        self.server, self.workers, self.interval = server, workers, interval
        self.seen_children: dict[int, set[int]] = {w: set() for w in workers}
        self.idle = self.sample()
        self.peak = dict(self.idle)
        self._task: asyncio.Task | None = None

    def children(self) -> list[tuple[int, int]]:
        """(worker, pid) of every run process: the children of each worker's launcher."""
        launchers = launchers_of(self.workers)
        out = []
        for pid in all_pids():
            f = proc_stat(pid)
            if f is not None and int(f[1]) in launchers and pid not in launchers:
                out.append((launchers[int(f[1])], pid))
        return out

    def sample(self) -> dict[str, float]:
        kids = self.children()
        for parent, pid in kids:
            self.seen_children[parent].add(pid)
        kid_rss = [rss_mib(pid) for _, pid in kids]
        server = rss_mib(self.server) if self.server and self.server not in self.workers else 0.0
        workers = sum(rss_mib(w) for w in self.workers)
        return {
            "server": server, "workers": workers, "runs": sum(kid_rss), "run_count": len(kid_rss),
            "run_max": max(kid_rss, default=0.0), "total": server + workers + sum(kid_rss),
        }

    async def _loop(self) -> None:
        while True:
            s = self.sample()
            if s["total"] > self.peak["total"] and s["run_count"]:
                # What the server, the workers and the runs' processes hold beyond idle, per run process alive then.
                self.peak["per_live_run"] = (s["total"] - self.idle["total"]) / s["run_count"]
            for k, v in s.items():
                self.peak[k] = max(self.peak[k], v)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.idle = self.sample()
        self.peak = {**self.idle, "per_live_run": 0.0}
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


class CpuMeter:
    """CPU seconds spent, per kind of process, between start() and stop()."""

    def __init__(self, server: int | None, workers: list[int], db_name: str | None) -> None:
        self.server, self.workers, self.db_name = server, workers, db_name
        self.redis = pids_matching(lambda c: c.startswith("redis-server"))
        self.start_values: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        me = os.times()
        out = {
            "machine": machine_busy_s(),
            "runs": runs_cpu_s(self.workers),
            # The floor's "worker" is this process itself: counted as the client.
            "worker": sum(cpu_s(w) for w in self.workers if w != os.getpid()),
            "server": cpu_s(self.server) if self.server and self.server not in self.workers else 0.0,
            "client": me.user + me.system,
            "redis": sum(cpu_s(p) for p in self.redis),
            "postgres": 0.0,
        }
        if self.db_name:
            mark = f" {self.db_name} "
            out["postgres"] = sum(cpu_s(p) for p in pids_matching(lambda c: c.startswith("postgres:") and mark in c))
        return out

    def start(self) -> None:
        self.start_values = self.read()

    def stop(self) -> None:
        end = self.read()
        self.spent = {k: end[k] - self.start_values.get(k, 0.0) for k in end}
        self.spent["other"] = self.spent["machine"] - sum(v for k, v in self.spent.items() if k != "machine")


# --- the Django helper process -----------------------------------------------------
# This process never sets Django up (django.setup() imports Daphne, which ties
# autobahn's txaio to Twisted; the clients here need asyncio). A spawned helper
# with the backend's environment makes the login cookie and reads the event log back.


def _helper_log(session_ids: list[str]) -> dict:
    """The event log of each session as the database has it: [(seq, kind, agent, status, turn)], status, error."""
    from sessions.models import Event, Run, Session, SessionState

    out = {}
    for sid in session_ids:
        session = Session.objects.filter(pk=sid).first()
        if session is None:
            out[sid] = {"events": [], "status": "missing", "error": "no such session"}
            continue
        rows = []
        for seq, kind, agent, content, data, created in Event.objects.filter(session_id=sid).order_by("seq").values_list(
            "seq", "kind", "agent", "content", "data", "created_at"
        ):
            m = TURN_RE.search(content) if kind == "message" else None
            status = (data or {}).get("status", "") if kind == "status" else ""
            rows.append((seq, kind, agent, status, int(m.group(1)) if m else -1, created.timestamp()))
        run = Run.objects.filter(session_id=sid).order_by("-number").first()
        # Every write of a run's events carries the state checkpoint, which bumps the state's version.
        writes = SessionState.objects.filter(session_id=sid).values_list("version", flat=True).first() or 0
        takeovers = Event.objects.filter(session_id=sid, kind="status", content__startswith="Taken over").count()
        out[sid] = {"events": rows, "status": session.status, "last_seq": session.last_seq,
                    "error": run.error if run else "", "takeovers": takeovers, "writes": writes}
    return out


def _helper_beats() -> dict:
    """How long ago each running run's lease was last renewed (claim or heartbeat), and how many have lapsed."""
    from django.utils import timezone

    from sessions.models import Run

    now = timezone.now()
    ages, lapsed = [], 0
    for beat, expires in Run.objects.filter(status=Run.Status.RUNNING).values_list("heartbeat_at", "lease_expires_at"):
        if beat:
            ages.append((now - beat).total_seconds())
        if expires and expires < now:
            lapsed += 1
    return {"max_age": max(ages, default=0.0), "lapsed": lapsed}


def _helper_start_cpu(token: str, reps: int, task: str, messages: int) -> list[float]:
    """CPU ms of this thread for each of ``reps`` Starts (the new-session form's POST) through Django's own
    request handler, each rolled back: the server's least work per Start. Left out: Daphne's HTTP and ASGI
    layers, the CSRF check (the test client skips it) and the commit's announcement to the workers. Inside
    the outer transaction the Start's own becomes a savepoint and its release, a statement more than its
    commit: a little high there."""
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.test import Client as DjangoClient

    user = get_user_model().objects.create_user(username=f"run-bench-{token}-start-cpu")
    web = DjangoClient(HTTP_HOST="127.0.0.1")
    web.force_login(user)
    form = {"task": task, "mode": MODE, "title": "", "max_rounds": str(messages), "auto_continue": "0"}
    spent = []
    for _ in range(reps + 1):  # the first one warms the view's imports and caches: left out
        with transaction.atomic():
            t0 = time.thread_time_ns()
            response = web.post("/sessions/new/", form)
            spent.append((time.thread_time_ns() - t0) / 1e6)
            transaction.set_rollback(True)  # no session kept, no run queued, no worker woken
        if response.status_code != 302:
            raise RuntimeError(f"Start answered {response.status_code}: {response.content[:300]!r}")
    return spent[1:]


def _helper_main(conn) -> None:
    serve_django_requests(conn, {"setup": login_users, "beats": _helper_beats, "log": _helper_log,
                                 "start_cpu": _helper_start_cpu})


class Helper(PipeHelper):
    def __init__(self) -> None:
        super().__init__(_helper_main, "run-bench-helper")


# --- server and worker processes ----------------------------------------------------


Proc = LoggedProcess  # waits for a log line with wait_for (bench.support)


# --- HTTP and WebSocket clients ----------------------------------------------------------


@dataclass
class Arrival:
    seq: int
    kind: str
    agent: str
    status: str
    turn: int
    t: int


class Page(SessionSocket):
    """One session page: Start (the form's POST), then its socket (reconnecting as the page's script does),
    recording every event that arrives."""

    REFUSALS = (4401, 4403, 4404)

    def __init__(self, port: int, cookies: dict[str, str], csrf: str, task: str, messages: int) -> None:
        super().__init__(port, cookies)
        self.csrf, self.task, self.messages = csrf, task, messages
        self.t_start = self.t_posted = self.t_first_agent = self.t_last = 0
        self.arrivals: list[Arrival] = []
        self.close_codes: list[int | None] = []
        self.error = ""
        self.ended = False  # the run's end (its final status event) arrived
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        form = {"task": self.task, "mode": MODE, "title": "", "max_rounds": str(self.messages),
                "auto_continue": "0", "csrfmiddlewaretoken": self.csrf}
        self.t_start = time.monotonic_ns()  # the Start button
        self.wall_start = time.time()  # to place the rows' created_at on the same time line
        status, headers, body = await http(self.port, "POST", "/sessions/new/", self.cookies, form)
        self.t_posted = time.monotonic_ns()
        location = dict(headers).get("Location", "")
        if status != 302 or not location.startswith("/sessions/"):
            raise RuntimeError(f"Start answered {status} {location!r}: {body[:300]!r}")
        self.session_id = location.strip("/").split("/")[-1]
        await self._connect()  # the page's socket, opened at once (a browser would load the page first)

    def stopped(self) -> bool:
        return self.done.done() or self.closing

    def last_seq(self) -> int:
        return self.arrivals[-1].seq if self.arrivals else 0  # the last event the page shows

    def give_up(self, why: str) -> None:
        self.error = f"gave up after {self.MAX_RECONNECTS} reconnects; last: {why}"
        self.done.set_result(None)

    def on_message(self, t: int, payload: bytes) -> None:
        for seq, kind, agent, inner in ARTICLE_RE.findall(payload):
            kind_s, agent_s = kind.decode(), agent.decode()
            status, turn = "", -1
            if kind_s == "status":
                m = BADGE_RE.search(inner)
                status = m.group(1).decode() if m else ""
            elif kind_s == "message":
                m = TURN_RE.search(inner.decode(errors="replace"))
                turn = int(m.group(1)) if m else -1
                if agent_s in SPEAKERS and not self.t_first_agent:
                    self.t_first_agent = t
            self.arrivals.append(Arrival(int(seq), kind_s, agent_s, status, turn, t))
            self.t_last = t
            if status in END_STATUSES and not self.done.done():
                self.ended = True
                self.done.set_result(None)

    def on_close(self, code: int | None, reason: str | None) -> None:
        self.closed()
        self.close_codes.append(code)
        if code in self.REFUSALS and not self.done.done():
            self.error = f"socket refused with code {code}"
            self.done.set_result(None)
        else:
            self._retry(f"closed with code {code} ({reason})")


class FirstFrame(SessionSocket):
    """A session page's socket that waits for its first frame only, and never reconnects."""

    def __init__(self, port: int, cookies: dict[str, str], session_id: str, after: int) -> None:
        super().__init__(port, cookies)
        self.session_id, self.after = session_id, after
        self.got: asyncio.Future = asyncio.get_running_loop().create_future()

    def stopped(self) -> bool:
        return self.closing or self.got.done()

    def last_seq(self) -> int:
        return self.after

    def connect_failed(self, exc: OSError) -> None:
        if not self.got.done():
            self.got.set_exception(exc)

    def on_message(self, t: int, payload: bytes) -> None:
        if not self.got.done():
            self.got.set_result(payload)

    def on_close(self, code: int | None, reason: str | None) -> None:
        self.closed()
        if not self.got.done():
            self.got.set_exception(RuntimeError(f"socket closed with code {code} ({reason}) before its first frame"))


async def socket_cpu(ctx: dict, plan: Plan, reps: int) -> list[float]:
    """The server's CPU ms for a page's socket up to its first frame (the handshake, the login and session
    checks, the read and render of one event, the send), one socket at a time, on a session whose run has
    ended. The server's every thread is counted, so anything else it did meanwhile counts too: the least of
    ``reps`` is the figure used."""
    cookies = ctx["cookies"][-1]  # a user of the N-run scenarios: its runs have ended (paused), none is live
    page = Page(ctx["port"], cookies, ctx["csrf"], "Throughput benchmark: a session for the socket's own CPU.",
                plan.messages)
    await page.start()
    await asyncio.wait_for(page.done, 60)
    await page.close()
    if page.error or not page.ended:
        raise RuntimeError(f"the socket probe's run did not end: {page.error}")
    out = []
    for _ in range(reps + 1):  # the first one warms the path: left out
        await asyncio.sleep(0.05)
        before = on_cpu_ms(ctx["server_pid"])
        sock = FirstFrame(ctx["port"], cookies, page.session_id, page.last_seq() - 1)
        await sock._connect()
        payload = await asyncio.wait_for(sock.got, 10)
        spent = on_cpu_ms(ctx["server_pid"]) - before
        if spent <= 0:
            raise RuntimeError("could not read the server's CPU clock")
        out.append(spent)
        await sock.close()
        if b"<article" not in payload:
            raise RuntimeError(f"the socket's first frame held no event: {payload[:200]!r}")
    return out[1:]


# --- checking what arrived against the database ----------------------------------------------


@dataclass
class Check:
    # Delivery: what each client received against the rows in the database.
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    mismatched: int = 0  # an event whose kind/agent/status/turn differs from its row
    # The log: the agent messages in the database against the script.
    log_duplicated: int = 0  # a scripted message written twice (the run executed twice)
    log_missing: int = 0
    log_reordered: int = 0
    bad_end: int = 0  # a run that did not end paused on its budget, or never ended
    takeovers: int = 0  # "Taken over after its worker stopped" status events
    notes: list[str] = field(default_factory=list)

    FIELDS = ("lost", "duplicated", "reordered", "mismatched", "log_duplicated", "log_missing", "log_reordered",
              "bad_end", "takeovers")

    @property
    def clean(self) -> bool:
        return not any(getattr(self, k) for k in self.FIELDS if k != "takeovers")

    def add(self, other: Check) -> None:
        for k in self.FIELDS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.notes += other.notes

    def delivery(self) -> str:
        return f"{self.lost}/{self.duplicated}/{self.reordered}" + (f" ({self.mismatched} differ)" if self.mismatched else "")

    def log(self) -> str:
        return f"{self.log_duplicated}/{self.log_missing}/{self.log_reordered}" + (f" ({self.bad_end} bad end)" if self.bad_end else "")


def check_page(page: Page, log: dict, messages: int) -> Check:
    c = Check()
    sid = page.session_id[:8]
    rows = {r[0]: tuple(r[:5]) for r in log["events"]}
    got = [a.seq for a in page.arrivals]
    # A run that never ended (timeout) goes on writing after the client left: only gaps before the
    # newest event it received count as lost; what came later was never due (the run is counted as a bad end).
    due = set(rows) if page.ended else {seq for seq in rows if seq <= max(got, default=0)}
    c.lost = len(due - set(got))
    c.duplicated = len(got) - len(set(got))
    c.reordered = sum(1 for a, b in zip(got, got[1:]) if b < a)
    for a in page.arrivals:
        row = rows.get(a.seq)
        if row is None or (a.kind, a.agent, a.status, a.turn) != row[1:]:
            c.mismatched += 1
    if c.lost or c.duplicated or c.reordered or c.mismatched:
        c.notes.append(f"session {sid}: delivered lost {c.lost}, duplicated {c.duplicated}, reordered {c.reordered}, "
                       f"differing {c.mismatched}; socket close codes {page.close_codes}")
    said = [(r[2], r[4]) for r in log["events"] if r[1] == "message"]
    script = [(SPEAKERS[t % 2], t) for t in range(messages)]
    seen: set = set()
    firsts = []
    for m in said:
        if m in seen:
            c.log_duplicated += 1
        else:
            seen.add(m)
            firsts.append(m[1])
    c.log_missing = len(set(script) - seen)
    c.log_reordered = sum(1 for a, b in zip(firsts, firsts[1:]) if b < a)
    c.bad_end = int(log["status"] != "paused")
    c.takeovers = log.get("takeovers", 0)
    if c.log_duplicated or c.log_missing or c.log_reordered or c.bad_end or c.takeovers:
        c.notes.append(f"session {sid}: status {log['status']}, {len(said)} agent messages in the log for a script of "
                       f"{messages} ({c.log_duplicated} written twice, {c.log_missing} missing, {c.log_reordered} out of "
                       f"order), taken over {c.takeovers} time(s)" + (f"; error: {log['error'][:200]}" if log.get("error") else ""))
    return c


STAGES = ("Start answered", "claimed", "engine's 1st event written", "1st agent message written", "1st agent fragment at client")


def first_fragment_stages(page: Page, rows: list) -> dict[str, float]:
    """Where Start -> first agent fragment went, in ms after Start, from the rows' created_at (set just before
    each INSERT, so a few ms before its commit) and the client's own clock."""
    def at(pred) -> float:
        row = next((r for r in rows if pred(r)), None)
        return (row[5] - page.wall_start) * 1000 if row else math.nan

    return {
        "Start answered": (page.t_posted - page.t_start) / 1e6,
        "claimed": at(lambda r: r[1] == "status" and r[3] == "running"),
        "engine's 1st event written": at(lambda r: r[1] not in ("status",)),
        "1st agent message written": at(lambda r: r[1] == "message" and r[2] in SPEAKERS),
        "1st agent fragment at client": (page.t_first_agent - page.t_start) / 1e6,
    }


# --- scenarios ------------------------------------------------------------------------------


_T0 = time.monotonic()


def elapsed() -> str:
    return f"[{time.monotonic() - _T0:5.0f} s]"


@dataclass
class Result:
    backend: str
    runs: int
    rounds: int = 0
    events: int = 0
    wall_s: float = 0.0  # summed over rounds: first Start -> last delivery
    first_ms: list[float] = field(default_factory=list)
    post_ms: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # delivered events/s of each round
    mem: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    children_by_worker: list[int] = field(default_factory=list)
    reconnects: int = 0
    stages: dict = field(default_factory=dict)  # stage -> [ms after Start, one per run]
    beat_age_max: float = 0.0  # s since the oldest lease renewal of a running run, at worst
    lapsed_max: int = 0  # running runs whose lease had run out, at worst
    writes: int = 0  # the runs' writes of engine events (transactions), summed
    engine_events: int = 0  # the engine events they wrote (the log without the Start's and the claim's rows)
    turn_cpu_ms: list[float] = field(default_factory=list)  # floor, 1 run: a spare's CPU from its run to its first message
    check: Check = field(default_factory=Check)

    @property
    def rate(self) -> float:
        return self.events / self.wall_s if self.wall_s else math.nan


async def run_round(port: int, cookies: list[dict], csrf: str, n: int, plan: Plan, label: str, timeout: float) -> tuple[list[Page], float]:
    pages = [Page(port, cookies[i], csrf, f"Throughput benchmark {label}, run {i + 1} of {n}: "
                  "propose research ideas on the CMB lensing power spectrum.", plan.messages) for i in range(n)]
    started = await asyncio.gather(*(p.start() for p in pages), return_exceptions=True)
    for page, outcome in zip(pages, started):
        if isinstance(outcome, BaseException):
            page.error = page.error or f"{type(outcome).__name__}: {outcome}"
    waiting = [p.done for p in pages if not p.error]
    if waiting:
        _, pending = await asyncio.wait(waiting, timeout=timeout)
        for page in pages:
            if page.done in pending:
                page.error = page.error or f"no end of run within {timeout:.0f} s ({len(page.arrivals)} events arrived)"
    await asyncio.sleep(0.3)  # anything sent twice or late arrives now
    await asyncio.gather(*(p.close() for p in pages))
    t0 = min(p.t_start for p in pages)
    t1 = max((p.t_last for p in pages if p.t_last), default=t0)
    return pages, (t1 - t0) / 1e9


async def watch_leases(helper: Helper, res: Result) -> None:
    """Once a second: the oldest lease renewal among running runs (the worker heartbeats every
    WORKER_LEASE_SECONDS / 3, default 10 s; at 30 s the lease lapses and the run may be claimed again)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(1.0)
        try:
            beats = await loop.run_in_executor(None, helper.request, "beats")
        except Exception:  # noqa: BLE001 - a diagnostic only
            continue
        res.beat_age_max = max(res.beat_age_max, beats["max_age"])
        res.lapsed_max = max(res.lapsed_max, beats["lapsed"])


async def run_scenario(backend: str, n: int, rounds: int, ctx: dict, plan: Plan) -> Result:
    res = Result(backend, n)
    sampler = Sampler(ctx["server_pid"], ctx["worker_pids"])
    meter = CpuMeter(ctx["server_pid"], ctx["worker_pids"], ctx.get("db_name"))
    helper: Helper = ctx["helper"]
    loop = asyncio.get_running_loop()
    timeout = 60 + 2.0 * n
    for r in range(rounds):
        await asyncio.sleep(0.5)  # let the previous round's processes go
        sampler.start()
        meter.start()
        watch = loop.create_task(watch_leases(helper, res))
        pages, wall = await run_round(ctx["port"], ctx["cookies"], ctx["csrf"], n, plan, f"{backend} {n}x r{r + 1}", timeout)
        watch.cancel()
        meter.stop()
        await sampler.stop()
        for k, v in meter.spent.items():
            res.cpu[k] = res.cpu.get(k, 0.0) + v
        for k in ("server", "workers", "total", "runs", "run_count", "run_max"):
            res.mem[f"idle_{k}"] = sampler.idle[k] if r == 0 else res.mem[f"idle_{k}"]
            res.mem[f"peak_{k}"] = max(res.mem.get(f"peak_{k}", 0.0), sampler.peak[k])
        res.mem["per_live_run"] = max(res.mem.get("per_live_run", 0.0), sampler.peak["per_live_run"])
        res.children_by_worker = [len(v) for v in sampler.seen_children.values()]
        logs = await loop.run_in_executor(None, helper.request, "log", [p.session_id for p in pages if p.session_id])
        for page in pages:
            if page.error:
                res.check.notes.append(f"{backend} {n} runs, session {page.session_id[:8] or '(none)'}: {page.error}")
            if page.session_id:
                log = logs[page.session_id]
                res.check.add(check_page(page, log, plan.messages))
                res.writes += log.get("writes", 0)
                res.engine_events += sum(1 for row in log["events"] if row[1] != "status")
            else:
                res.check.bad_end += 1  # Start itself failed
            if page.t_first_agent:
                res.first_ms.append((page.t_first_agent - page.t_start) / 1e6)
            if page.t_posted:
                res.post_ms.append((page.t_posted - page.t_start) / 1e6)
            if page.session_id and page.t_first_agent:
                for stage, ms in first_fragment_stages(page, logs[page.session_id]["events"]).items():
                    res.stages.setdefault(stage, []).append(ms)
        delivered = sum(len(p.arrivals) for p in pages)
        res.reconnects += sum(p.reconnects for p in pages)
        res.events += delivered
        res.wall_s += wall
        res.rates.append(delivered / wall if wall else math.nan)
        res.rounds += 1
        print(f"{elapsed()} {backend:>8} {n:>2} run(s) round {r + 1}: {delivered} events in {wall:.2f} s "
              f"= {delivered / wall:.0f}/s; first agent fragment p50 {pct(res.first_ms[-n:], 50):.0f} ms, "
              f"max {max(res.first_ms[-n:], default=math.nan):.0f} ms", file=sys.stderr)
    return res


# --- the engine-only floor ---------------------------------------------------------------------


async def floor_one(spec: dict) -> tuple[int, int, int, int, str]:
    """One bare engine process, forked from this process's launcher as a worker forks it: (t_spawn,
    t_first_message, t_end, events, outcome status)."""
    from orchestrator.engine.process import EngineProcess

    t0 = time.monotonic_ns()
    proc = await EngineProcess.spawn(spec)
    first = events = 0
    status = "no outcome"
    async for msg in proc.messages():
        if msg["type"] == "event":
            events += 1
            if not first and msg["event"]["kind"] == "message" and msg["event"]["agent"] in SPEAKERS:
                first = time.monotonic_ns()
        elif msg["type"] == "outcome":
            status = msg["status"]
        elif msg["type"] == "fatal":
            status = f"fatal: {msg['detail']}"
    await proc.wait()
    err = proc.stderr_tail()
    if status != "paused" and err:
        status += " " + err[-300:]
    return t0, first, time.monotonic_ns(), events, status


async def first_turn_cpu(spec: dict, reps: int) -> list[float]:
    """CPU ms that a run's process spends from being handed its run to its first agent message, when it was
    forked and rehearsed ahead (a spare, as a warm worker keeps): the least a Start costs on the runs' side,
    however many processes are kept ready. Read from the child's CPU clock as the first message arrives, so
    it includes what the child did meanwhile (its next turn under way): a little high, never low."""
    from orchestrator.engine.process import EngineProcess

    launcher = next(iter(launchers_of([os.getpid()])), None)
    if launcher is None:
        raise RuntimeError("no run launcher under this process")
    out = []
    for _ in range(reps):
        await EngineProcess.keep_spares(1)
        spare, settled, last = None, 0, -1.0
        deadline = time.monotonic() + 10
        while settled < 5:  # its rehearsal over: the spare waits for its run, off the CPU (100 ms still)
            if time.monotonic() > deadline:
                raise RuntimeError("the spare did not settle within 10 s")
            await asyncio.sleep(0.02)
            live = list(children_of(launcher))
            spare = live[0] if len(live) == 1 else None
            now = on_cpu_ms(spare) if spare else -1.0
            settled = settled + 1 if spare and now == last else 0
            last = now
        proc = await EngineProcess.spawn(spec)
        if proc.pid != spare:
            raise RuntimeError("the run did not go to the spare")
        at_first = None
        async for msg in proc.messages():
            if (at_first is None and msg["type"] == "event" and msg["event"]["kind"] == "message"
                    and msg["event"]["agent"] in SPEAKERS):
                at_first = on_cpu_ms(proc.pid)
        await proc.wait()
        if at_first is None:
            raise RuntimeError(f"the spare's run sent no agent message: {proc.stderr_tail()[-300:]}")
        if at_first <= last:
            raise RuntimeError("could not read the spare's CPU clock")
        out.append(at_first - last)
    return out


async def run_floor(n: int, rounds: int, env: dict, work_dir: Path, plan: Plan) -> Result:
    res = Result("floor", n)
    from orchestrator.engine.process import warm_launcher

    spec = {
        "task": "Throughput benchmark floor: propose research ideas on the CMB lensing power spectrum.",
        "mode": MODE, "work_dir": str(work_dir), "provider": "replay", "max_turns": plan.messages,
        "auto_continue": 0, "policy": {}, "history": [], "answer": None, "memory_limit_mb": 4096,
    }
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the runs' environment (the replay script), as a worker would hand it on
    try:
        await asyncio.to_thread(warm_launcher)
        await _floor_rounds(res, n, rounds, spec, plan)
        if n == 1:
            res.turn_cpu_ms = await first_turn_cpu(spec, max(rounds, 5))
        return res
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def _floor_rounds(res: Result, n: int, rounds: int, spec: dict, plan: Plan) -> Result:
    me = os.getpid()
    for _ in range(rounds):
        await asyncio.sleep(0.3)
        sampler = Sampler(None, [me])
        meter = CpuMeter(None, [me], None)
        sampler.start()
        meter.start()
        out = await asyncio.gather(*(floor_one(spec) for _ in range(n)))
        meter.stop()
        await sampler.stop()
        for k, v in meter.spent.items():
            res.cpu[k] = res.cpu.get(k, 0.0) + v
        res.mem["peak_runs"] = max(res.mem.get("peak_runs", 0.0), sampler.peak["runs"])
        res.mem["peak_run_count"] = max(res.mem.get("peak_run_count", 0), sampler.peak["run_count"])
        res.mem["peak_run_max"] = max(res.mem.get("peak_run_max", 0.0), sampler.peak["run_max"])
        t0, t1 = min(o[0] for o in out), max(o[2] for o in out)
        events = sum(o[3] for o in out)
        res.events += events
        res.wall_s += (t1 - t0) / 1e9
        res.rates.append(events / ((t1 - t0) / 1e9))
        res.first_ms += [(o[1] - o[0]) / 1e6 for o in out if o[1]]
        res.rounds += 1
        bad = [o[4] for o in out if o[4] != "paused"]
        if bad:
            res.check.bad_end += len(bad)
            res.check.notes.append(f"floor {n}: {bad[0]}")
    print(f"{elapsed()} {'floor':>8} {n:>2} run(s): {res.events / res.rounds:.0f} events/round, {res.rate:.0f}/s; first message "
          f"p50 {pct(res.first_ms, 50):.0f} ms, max {max(res.first_ms, default=math.nan):.0f} ms", file=sys.stderr)
    return res


# --- profiling (optional: --profile, needs py-spy) -----------------------------------------------

# Frames that only say "a thread", "the event loop" or "a management command": left out of the summary.
_PLUMBING = re.compile(r"threading\.py|concurrent/futures|asyncio/(base_events|events|selector_events|runners)\.py|"
                       r"manage\.py|asgiref/(sync|server)\.py|channels/db\.py|core/management|commands/(serve|runworker)\.py|twisted/|daphne/server\.py|"
                       r"channels/(worker|management)|<module>")


class Profiler:
    """py-spy record on one process until stop(): raw (collapsed) stacks, all threads, idle time left out."""

    def __init__(self, binary: str, pid: int, out: Path) -> None:
        self.out = out
        self.process = subprocess.Popen([binary, "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
                                         "--format", "raw", "--output", str(out)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: py-spy writes its file and exits
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def profile_summary(path: Path, top: int = 22) -> list[str]:
    """Inclusive share of the samples of each function (a function counted once per stack)."""
    import collections

    incl: collections.Counter = collections.Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return [f"  (no profile at {path})"]
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            key = f"{name} ({where.split(':')[0]})" if where else name
            if key not in seen:
                seen.add(key)
                incl[key] += n
    if not total:
        return ["  (no samples)"]
    rows = [(v, k) for k, v in incl.most_common() if not _PLUMBING.search(k)][:top]
    return [f"  {100 * v / total:5.1f}%  {k.replace(str(ROOT) + '/', '')[:120]}" for v, k in rows] + [f"  ({total} samples)"]


# --- backends ------------------------------------------------------------------------------------


def run_backend(name: str, env: dict, tmp: Path, plan: Plan, token: str, db_name: str | None) -> tuple[list[Result], dict]:
    """Start the processes of one backend, warm them up, run every scenario, stop them."""
    procs: list[Proc] = []
    helper: Helper | None = None
    saved = dict(os.environ)
    info: dict = {}
    try:
        os.environ.clear()
        os.environ.update(env)  # the helper is spawned with this environment
        print(f"{elapsed()} {name}: migrating, starting the server and worker(s)", file=sys.stderr)
        migrate(env)
        helper = Helper()
        fx = helper.request("setup", token, max(plan.concurrency))
        port = free_port()
        if name == "embedded":
            server = Proc("server", [sys.executable, "manage.py", "serve", "--host", HOST, "--port", str(port)],
                          env, tmp / f"{name}-server.log")
            procs.append(server)
            workers = [server]
        else:
            server = Proc("server", [sys.executable, "manage.py", "serve", "--no-worker", "--host", HOST, "--port",
                                     str(port)], env, tmp / f"{name}-server.log")
            procs.append(server)
            workers = []
            for i in range(plan.workers):
                w = Proc(f"worker{i + 1}", [sys.executable, "manage.py", "runworker", "orchestrator"], env,
                         tmp / f"{name}-worker{i + 1}.log")
                procs.append(w)
                workers.append(w)
        server.wait_for("Serving on")
        for w in workers:
            w.wait_for("serving (up to")

        async def go() -> list[Result]:
            # The CSRF cookie is not tied to a login: one token serves every user.
            csrf_cookie, csrf = await csrf_token(port, {"sessionid": fx["cookies"][0]})
            cookies = [{"sessionid": c, "csrftoken": csrf_cookie} for c in fx["cookies"]]
            ctx = {"port": port, "cookies": cookies, "csrf": csrf, "helper": helper, "server_pid": server.pid,
                   "worker_pids": [w.pid for w in workers], "db_name": db_name}
            # Warm-up: the worker, its threads and connections; not reported, but checked.
            warm = await run_scenario(name, 1, plan.warmup, ctx, plan)
            info["warmup_check"] = warm.check
            out = []
            for n in plan.concurrency:
                profilers = []
                if plan.py_spy and n == max(plan.concurrency):
                    # The workers, and the server when it is a process of its own (PostgreSQL + Redis).
                    profiled = workers if server in workers else [server, *workers]
                    profilers = [Profiler(plan.py_spy, p.pid, tmp / f"{name}-{p.name}.raw") for p in profiled]
                    await asyncio.sleep(1.0)  # py-spy attaches
                out.append(await run_scenario(name, n, plan.single_reps if n == 1 else plan.multi_rounds, ctx, plan))
                for prof in profilers:
                    prof.stop()
                    info.setdefault("profiles", []).append((f"{name} {prof.out.stem.split('-', 1)[1]}, {n} runs", prof.out))
            if max(plan.concurrency) > 1:
                info["socket_cpu_ms"] = await socket_cpu(ctx, plan, 10)
            return out

        results = asyncio.run(go())
        # After the scenarios: each Start here holds the database for a moment (SQLite: its one writer).
        if max(plan.concurrency) > 1:
            info["start_cpu_ms"] = helper.request("start_cpu", token, 10, "Throughput benchmark: the Start's own CPU.",
                                              plan.messages)
        info["vendor"] = fx["vendor"]
        info["live_limit"] = fx["live_limit"]
        for p in procs:
            text = p.text()
            crashes = text.count("Exception inside application") + text.count("Traceback")
            if crashes:
                info.setdefault("notes", []).append(f"{crashes} traceback(s) in the {name} {p.name} log ({p.log.name})")
            if p.process.poll() is not None:
                raise RuntimeError(f"{name} {p.name} died during the run:\n{p.tail()}")
        return results, info
    finally:
        if helper is not None:
            helper.stop()
        for p in procs:
            p.stop()
        os.environ.clear()
        os.environ.update(saved)


# --- report ---------------------------------------------------------------------------------------


def first_fragment_bound(results: dict[str, list[Result]], floor: dict[int, Result], infos: dict[str, dict]) -> list[list[str]]:
    """Rows of the least time in which N Starts can all reach their first agent fragment on this machine's CPUs.

    Each Start costs at least the server's work on the form's POST, its run's process's work to its first
    message, and the server's work on its page's socket up to the first frame; N of them need N times that,
    shared by the CPUs at best. This leaves out every other cost on the way (the claim, the first write,
    the announcement, forking the process: a process forked and rehearsed ahead is assumed for every run),
    and takes each part at the least it was seen to cost. The first turn is read a little late (see
    first_turn_cpu), so the rows also give the bound without it, from the Start and the socket alone."""
    turn = floor.get(1).turn_cpu_ms if floor.get(1) else []
    cpus = os.cpu_count() or 1
    rows = []
    for backend, rs in results.items():
        start = infos.get(backend, {}).get("start_cpu_ms") or []
        sock = infos.get(backend, {}).get("socket_cpu_ms") or []
        if not start or not turn or not sock:
            continue
        least = min(start) + min(turn) + min(sock)
        for r in rs:
            if r.runs < 2:
                continue
            target = 200 if r.runs >= 50 else None
            bound = r.runs * least / cpus
            server_only = r.runs * (min(start) + min(sock)) / cpus
            rows.append([
                backend, str(r.runs), f"{pct(start, 50):.1f} ({min(start):.1f})", f"{pct(turn, 50):.1f} ({min(turn):.1f})",
                f"{pct(sock, 50):.1f} ({min(sock):.1f})",
                f"{least:.1f}", f"{bound:.0f}", f"{server_only:.0f}", f"{target}" if target else "-",
                ("cannot be met" if server_only > target else "not ruled out") if target else "-",
                f"{max(r.first_ms, default=math.nan):.0f}",
            ])
    return rows


def report(results: dict[str, list[Result]], floor: dict[int, Result], header: list[str], infos: dict[str, dict]) -> None:
    for line in header:
        print(line)
    print()
    cols = ["backend", "runs", "rounds", "events", "events/s", "floor ev/s", "time vs floor", "1st frag p50 ms",
            "p95 ms", "max ms", "floor 1st p50", "target", "POST p50 ms", "ev/write", "reconn", "lease age s",
            "lost/dup/reord", "log dup/miss/reord", "takeovers"]
    rows = []
    for backend, rs in results.items():
        for r in rs:
            f = floor.get(r.runs)
            target_ms = 50 if r.runs == 1 else 200 if r.runs >= 50 else None
            met = []
            if target_ms is not None:
                met.append("1st " + ("met" if max(r.first_ms, default=math.inf) <= target_ms else "MISSED"))
            if r.runs >= 50:
                met.append("ev/s " + ("met" if r.rate >= 1000 else "MISSED"))
            # The same work in wall time: the app's time for its events over the floor's time for the floor's events.
            ratio = (r.wall_s / r.rounds) / (f.wall_s / f.rounds) if f and f.wall_s else math.nan
            rows.append([
                backend, str(r.runs), str(r.rounds), str(r.events), f"{r.rate:.0f}", f"{f.rate:.0f}" if f else "-",
                f"{ratio:.2f}x" if ratio == ratio else "-", f"{pct(r.first_ms, 50):.0f}", f"{pct(r.first_ms, 95):.0f}",
                f"{max(r.first_ms, default=math.nan):.0f}", f"{pct(f.first_ms, 50):.0f}" if f else "-",
                ", ".join(met) or "-", f"{pct(r.post_ms, 50):.0f}",
                f"{r.engine_events / r.writes:.1f}" if r.writes else "-", str(r.reconnects),
                f"{r.beat_age_max:.0f}" + (f" ({r.lapsed_max} lapsed)" if r.lapsed_max else ""),
                r.check.delivery(), r.check.log(), str(r.check.takeovers),
            ])
    print_table(cols, rows)
    print()
    cols = ["backend", "runs", *(f"{st} p50 (max)" for st in STAGES)]
    rows = []
    for backend, rs in results.items():
        for r in rs:
            rows.append([backend, str(r.runs)] + [
                f"{pct(r.stages.get(st, []), 50):.0f} ({max(r.stages.get(st, []), default=math.nan):.0f})" for st in STAGES
            ])
    print("Start -> first agent fragment, stage by stage (ms after Start; rows' created_at on the client's time line):")
    print_table(cols, rows)
    print()
    rows = first_fragment_bound(results, floor, infos)
    if rows:
        cols = ["backend", "runs", "Start CPU ms p50 (min)", "first turn CPU ms p50 (min)", "socket CPU ms p50 (min)",
                "least per Start ms",
                f"bound: all N first fragments ms ({os.cpu_count()} CPUs)", "without the first turn ms", "target ms",
                "target", "measured max ms"]
        print("The least time for N Starts to reach their first agent fragments: N x (the server's CPU for a Start + "
              "a forked-ahead run process's CPU to its first message + the server's CPU for the page's socket to its "
              "first frame) / CPUs, each at its least (see bench/README.md):")
        print_table(cols, rows)
        print()
    elif any(r.runs > 1 for rs in results.values() for r in rs):
        print("(No bound on the N-run first fragments: it needs the 1-run floor and the 1-run scenario's costs; "
              "run with 1 in --concurrency and without --no-floor.)")
        print()
    cols = ["backend", "runs", "server MiB", "worker MiB", "run procs (peak)", "MiB/run proc", "total idle->peak MiB",
            "MiB per run", "MiB per live run"]
    rows = []
    for backend, rs in results.items():
        for r in rs:
            m = r.mem
            per_run = (m["peak_total"] - m["idle_total"]) / r.runs
            server = "(in worker)" if backend == "embedded" else f"{m['idle_server']:.0f}->{m['peak_server']:.0f}"
            workers = f"{m['idle_workers']:.0f}->{m['peak_workers']:.0f}"
            split = "+".join(str(c) for c in r.children_by_worker) if len(r.children_by_worker) > 1 else ""
            rows.append([
                backend, str(r.runs), server, workers,
                f"{m['peak_run_count']:.0f}" + (f" ({split})" if split else ""),
                f"{m['peak_runs'] / max(m['peak_run_count'], 1):.0f} (max {m['peak_run_max']:.0f})",
                f"{m['idle_total']:.0f}->{m['peak_total']:.0f}", f"{per_run:.0f}", f"{m['per_live_run']:.0f}",
            ])
    for n, f in sorted(floor.items()):
        rows.append(["floor", str(n), "-", "-", f"{f.mem['peak_run_count']:.0f}",
                     f"{f.mem['peak_runs'] / max(f.mem['peak_run_count'], 1):.0f} (max {f.mem['peak_run_max']:.0f})",
                     "-", f"{f.mem['peak_runs'] / n:.0f}", f"{f.mem['peak_runs'] / max(f.mem['peak_run_count'], 1):.0f}"])
    print_table(cols, rows)
    print()
    kinds = ["runs", "worker", "server", "postgres", "redis", "client", "other"]
    cols = ["backend", "runs", "CPU s", "CPU ms/event"] + [f"{k} ms/ev" for k in kinds]
    rows = []
    for backend, rs in [*results.items(), ("floor", [floor[n] for n in sorted(floor)])]:
        for r in rs:
            ev = max(r.events, 1)
            rows.append([backend, str(r.runs), f"{r.cpu.get('machine', 0):.1f}", f"{r.cpu.get('machine', 0) * 1000 / ev:.2f}"]
                        + [f"{r.cpu.get(k, 0) * 1000 / ev:.2f}" for k in kinds])
    print_table(cols, rows)


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 runs, fewer repetitions (about 70 s)")
    parser.add_argument("--backends", default="embedded,postgres", help="comma-separated: embedded, postgres")
    parser.add_argument("--concurrency", help="comma-separated concurrent runs (default 1,10,50)")
    parser.add_argument("--single-reps", type=int, help="repetitions of the 1-run scenario")
    parser.add_argument("--rounds", type=int, help="repetitions of each N-run scenario")
    parser.add_argument("--workers", type=int, help="runworker processes on PostgreSQL + Redis (default 2)")
    parser.add_argument("--no-floor", action="store_true", help="skip the engine-only floor")
    parser.add_argument("--profile", action="store_true",
                        help="record the worker process(es), and the server if apart, with py-spy (PY_SPY or on PATH) during the largest scenario")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, SQLite database)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    plan = Plan.quick() if args.quick else Plan()
    if args.concurrency:
        plan.concurrency = tuple(int(x) for x in args.concurrency.split(","))
    if args.single_reps:
        plan.single_reps = args.single_reps
    if args.rounds:
        plan.multi_rounds = args.rounds
    if args.workers:
        plan.workers = args.workers
    plan.floor = not args.no_floor
    if args.profile:
        plan.py_spy = os.environ.get("PY_SPY") or shutil.which("py-spy") or ""
        if not plan.py_spy:
            print("--profile needs py-spy: `pip install py-spy` somewhere, and PY_SPY=its path", file=sys.stderr)
            return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    token = secrets.token_hex(4)
    tmp = Path(tempfile.mkdtemp(prefix="run-bench-"))
    script_path = tmp / "replay.json"
    script_path.write_text(json.dumps(replay_script(plan.messages, plan.message_bytes)))
    max_runs = max(plan.concurrency)
    base_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CHANNELS_PREFIX")}
    base_env.update({
        "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE") or "cmbagent_site.settings",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
        "CMBAGENT_MODEL_PROVIDER": "replay",
        "CMBAGENT_REPLAY_SCRIPT": str(script_path),
        "CMBAGENT_OFFLINE_LATENCY": "0",
        "WORKER_MAX_RUNS": str(max_runs),  # default 4: raised so that the worker never caps the concurrency
        "PYTHONUNBUFFERED": "1",
    })
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    admin_url = os.environ.get("BENCH_PG_ADMIN_URL") or DEFAULT_PG_ADMIN_URL
    db_name = f"cmbagent_bench_{os.getpid()}"
    prefix = f"runbench{token}"
    results: dict[str, list[Result]] = {}
    floor: dict[int, Result] = {}
    infos: dict[str, dict] = {}
    notes: list[str] = []
    header_db: list[str] = []
    rconn = None
    created_db = False
    try:
        print(f"run throughput benchmark in {tmp} ...", file=sys.stderr)
        if plan.floor:
            env = {**base_env, "CMBAGENT_VAR_DIR": str(tmp / "floor")}
            for n in plan.concurrency:
                floor[n] = asyncio.run(run_floor(n, plan.single_reps if n == 1 else plan.multi_rounds, env,
                                                 tmp / "floor" / "work", plan))
        for backend in backends:
            if backend == "embedded":
                env = {**base_env, "CMBAGENT_VAR_DIR": str(tmp / "embedded"), "EMBEDDED_WORKER": "1"}
                results[backend], infos[backend] = run_backend(backend, env, tmp, plan, token, None)
                header_db.append("embedded: `manage.py serve` (Daphne + run worker in one process), SQLite (WAL, "
                                 "synchronous=NORMAL) in a temp dir, in-memory channel layer")
            elif backend == "postgres":
                try:
                    import redis

                    rconn = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
                    rconn.ping()
                    pg_database(admin_url, db_name, create=True)
                    created_db = True
                    pg = pg_settings(admin_url)
                except Exception as exc:  # noqa: BLE001 - reported, that backend is skipped
                    notes.append(f"postgres backend skipped: {type(exc).__name__}: {exc}")
                    print(notes[-1], file=sys.stderr)
                    continue
                db_url = admin_url.rsplit("/", 1)[0] + "/" + db_name
                env = {**base_env, "CMBAGENT_VAR_DIR": str(tmp / "postgres"), "EMBEDDED_WORKER": "0",
                       "DATABASE_URL": db_url, "REDIS_URL": redis_url, "CHANNELS_PREFIX": prefix}
                results[backend], infos[backend] = run_backend(backend, env, tmp, plan, token, db_name)
                header_db.append(f"postgres: `manage.py serve --no-worker` + {plan.workers} x `runworker orchestrator`, "
                                 f"{pg}, channels_redis at {redis_url}")
            else:
                raise SystemExit(f"unknown backend {backend!r}")
        header = [
            "Run throughput: Start (new-session POST) -> fragments at the session's WebSocket client (loopback)",
            f"script: {' and '.join(SPEAKERS)} handing off, {plan.messages} messages of {plan.message_bytes} bytes, "
            f"the run pausing on its {plan.messages}-turn budget; mode {MODE}, replay model, no model latency",
            f"each run: its own session and user, a client connected right after the POST; 1 run: {plan.single_reps} "
            f"runs one after another; N runs: all Started at once, {plan.multi_rounds} round(s); warm-up not reported",
            *header_db,
            f"DEBUG={'on' if base_env.get('DEBUG', '1').strip().lower() in ('1', 'true', 'yes', 'on') else 'off'} "
            f"(settings {base_env['DJANGO_SETTINGS_MODULE']}); WORKER_MAX_RUNS={max_runs} (default 4); "
            f"MAX_LIVE_RUNS_PER_USER={next(iter(infos.values()), {}).get('live_limit', '?')} (one user per run); floor: the same runs as bare engine processes, events read "
            "and dropped (no database, no layer, no socket)",
            f"Python {platform.python_version()}, {versions()}",
            f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
            f"total {time.monotonic() - started:.0f} s",
        ]
        for backend, info in infos.items():
            header += [f"NOTE: {n}" for n in info.get("notes", [])]
        header += [f"NOTE: {n}" for n in notes]
        cpus = os.cpu_count() or 1
        if load_before > 0.5 * cpus:
            header.append("NOTE: the machine was busy before the run; the figures include that contention.")
        report(results, floor, header, infos)
        total = Check()
        for rs in results.values():
            for r in rs:
                total.add(r.check)
        for f in floor.values():
            total.add(f.check)
        for info in infos.values():
            total.add(info["warmup_check"])
        print()
        print(f"delivery: events lost {total.lost}, duplicated {total.duplicated}, reordered {total.reordered}, "
              f"differing from their row {total.mismatched}")
        print(f"log: agent messages written twice {total.log_duplicated}, missing {total.log_missing}, out of order "
              f"{total.log_reordered}; runs not ending as scripted {total.bad_end}; takeovers {total.takeovers}")
        parts, met = [], True
        for backend, rs in results.items():
            for r in rs:
                first, worst = pct(r.first_ms, 50), max(r.first_ms, default=math.inf)
                bound = 50 if r.runs == 1 else 200
                met = met and worst <= bound and (r.runs < 50 or r.rate >= 1000)
                parts.append(f"{backend} {r.runs}: {r.rate:.0f} ev/s, 1st fragment p50 {first:.0f} ms (max {worst:.0f})")
        bounds = [f"{row[0]} {row[1]}: {row[6]} ms" for row in first_fragment_bound(results, floor, infos) if int(row[1]) >= 50]
        if bounds:
            parts.append("least possible max 1st fragment (CPU bound) " + ", ".join(bounds))
        headline(
            "run_throughput.py", "Start -> first agent fragment, and delivered events/s, at 1, 10 and 50 concurrent runs",
            "; ".join(parts) + f"; lost/duplicated/reordered {total.lost}/{total.duplicated}/{total.reordered}",
            "1st fragment <= 50 ms (1 run), <= 200 ms (50); >= 1,000 ev/s at 50", "met" if met and total.clean else "MISSED",
        )
        for note in total.notes[:20]:
            print(f"  {note}")
        if len(total.notes) > 20:
            print(f"  ... and {len(total.notes) - 20} more")
        for info in infos.values():
            for label, path in info.get("profiles", []):
                print(f"\nwhere the {label} process spent its busy samples (py-spy, inclusive, all threads):")
                print("\n".join(profile_summary(path)))
        if args.json:
            args.json.write_text(json.dumps({
                "header": header,
                "results": {b: [{**r.__dict__, "check": r.check.__dict__} for r in rs] for b, rs in results.items()},
                "floor": {n: {**f.__dict__, "check": f.check.__dict__} for n, f in floor.items()},
                "start_cpu_ms": {b: info.get("start_cpu_ms") for b, info in infos.items()},
                "socket_cpu_ms": {b: info.get("socket_cpu_ms") for b, info in infos.items()},
            }, indent=1, default=str))
        return 0 if total.clean and results else 1
    finally:
        if created_db:
            try:
                pg_database(admin_url, db_name, create=False)
            except Exception as exc:  # noqa: BLE001
                print(f"could not drop database {db_name}: {exc}", file=sys.stderr)
        if rconn is not None:
            try:
                keys = list(rconn.scan_iter(match=f"{prefix}*", count=1000))
                if keys:
                    rconn.delete(*keys)
            except Exception:  # noqa: BLE001
                pass
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
