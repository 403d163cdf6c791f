#!/usr/bin/env python
"""Load: many concurrent sessions on the offline model for minutes, on PostgreSQL + Redis.

N simulated people (``--sessions``, default 200) each keep one session live
for the whole test (``--minutes``, default 10): Start it with the new-session
form's POST, load its page, open its socket like the page does (session cookie,
``Origin``, ``{"type": "hello", "after": <last seq on the page>}``), follow it
to its end, press Continue (an htmx POST) whenever it pauses on its round
budget, and Start the next one as soon as it completes. The team runs on the
offline model with a per-reply latency (``CMBAGENT_OFFLINE_LATENCY``,
``--latency``, default 2 s), so the runs wait on their "model" like real ones
instead of being 200 CPU-bound loops. The sessions cycle through a mix of
modes (planning and control with a round budget of 5, idea generation, one
shot, planning and control without a budget).

The app runs as it would be deployed: ``--servers`` (default 2) ``manage.py
serve --no-worker`` and ``--workers`` (default 2) ``manage.py runworker
orchestrator`` processes, DEBUG off, on a PostgreSQL database of its own and
Redis under a channel prefix of its own. Everything is on loopback.

Reported, over the measurement window (after a ramp-up and a settling time):

* events delivered per second: distinct (session, seq) fragments that reached
  the clients (from the page or the socket) in the window, per second;
* push latency p50/p90/p99/max: arrival at the client minus the event row's
  ``created_at`` (set just before its INSERT, so this is an upper bound of
  commit -> client by the writing transaction's own duration), for every
  fragment that came over a socket in the window;
* errors, by kind (goal: none): HTTP answers other than 2xx/3xx and refused
  requests, socket closes nobody asked for, sessions that failed or stalled,
  runs taken over after a lapsed lease, tracebacks and ERROR lines in the
  server and worker logs, a process that died, and, against the database at
  the end, every session's events lost, duplicated, reordered or differing at
  its client;
* RSS of each server and worker process (and of each worker's run launcher and
  all run processes) at the window's start and end, the peak, and the slope of
  the sampled curve (MiB/min, over the window and over its second half) to
  judge "flat"; CPU time per kind of process; the run queue and leases.

    .venv/bin/python bench/load.py                              # 200 sessions, 10 minutes (about 13 min in all)
    .venv/bin/python bench/load.py --sessions 20 --minutes 1    # a small try, about 3 min
    .venv/bin/python bench/load.py --json load.json             # also write every figure as JSON
    make bench-load

PostgreSQL: ``DATABASE_URL`` (default postgres://postgres@127.0.0.1:5432/postgres)
is used only to create a database of its own, ``cmbagent_load_<pid>``, which is
dropped at the end. Redis: ``REDIS_URL`` (default redis://127.0.0.1:6379/0);
the keys carry the prefix ``load<token>`` and are deleted at the end. Logs, run
folders and the like live in a temp dir (``--keep`` keeps it). Every process
is stopped at the end, also on Ctrl-C, SIGTERM, a failure or the hard time
limit. The exit status is 1 if there was any error (including anything lost,
duplicated or reordered), 2 if the test could not run.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.support import (  # noqa: E402 - needs ROOT on the path
    ARTICLE_RE, BADGE_RE, HOST, LoggedProcess, PipeHelper, SessionSocket, all_pids, cmdline, cpu_s, csrf_token, free_port,
    headline, http, launchers_of, login_users, machine_busy_s, migrate, pct, pg_database, pg_settings, pids_matching,
    print_table, proc_stat, rss_mib, runs_cpu_s, serve_django_requests, versions,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# (mode, round budget): cycled through as sessions start. A budget of 5 pauses a planning run twice.
MIX = (("planning_and_control", 5), ("idea_generation", None), ("one_shot", None), ("planning_and_control", None))
TASK = "Load test {n}: plot a damped cosine and tabulate its peak amplitude."
ENDS = {"paused", "completed", "failed", "cancelled", "waiting_approval", "suspended"}
STALL_S = 180.0  # a session with no new event for this long is stalled: an error, and it is cancelled
HTTP_TIMEOUT_S = 60.0
REFUSALS = (4401, 4403, 4404, 4429)
SOCKET_ERROR = b'id="socket-errors"'
LOG_ERROR_RE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) (\S+): (.*)$", re.M)
LOG_LEASE_RE = re.compile(r"lost the lease|was taken over|ended unexpectedly|could not record the end")
RSS_EVERY_S = 1.0
RUNS_EVERY_S = 5.0
STATUS_EVERY_S = 5.0
PROGRESS_EVERY_S = 30.0


# --- the Django helper process ---------------------------------------------------------------------
# This process never sets Django up (Daphne's import ties autobahn's txaio to Twisted; the clients
# need asyncio). A spawned helper logs the users in, watches the run queue and reads the log back.


def _helper_status() -> dict:
    """Runs queued and running, the oldest lease renewal among running runs, lapsed leases, connections."""
    from django.db import connection
    from django.utils import timezone

    from sessions.models import Run

    now = timezone.now()
    queued = Run.objects.filter(status=Run.Status.QUEUED).count()
    ages, lapsed = [], 0
    for beat, expires in Run.objects.filter(status=Run.Status.RUNNING).values_list("heartbeat_at", "lease_expires_at"):
        if beat:
            ages.append((now - beat).total_seconds())
        if expires and expires < now:
            lapsed += 1
    with connection.cursor() as cursor:
        cursor.execute("select count(*) from pg_stat_activity where datname = current_database()")
        connections = cursor.fetchone()[0]
    return {"queued": queued, "running": len(ages), "lease_age": max(ages, default=0.0), "lapsed": lapsed,
            "connections": connections}


def _helper_log() -> dict:
    """Every session's events as the database has them, with the sessions' ends, failures and takeovers."""
    from django.db.models import Count
    from django.db.models.fields.json import KT

    from sessions.models import Event, Run, Session

    events: dict[str, list] = {}
    rows = (Event.objects.order_by("session_id", "seq")
            .values_list("session_id", "seq", "kind", KT("data__status"), "created_at").iterator(chunk_size=20_000))
    for sid, seq, kind, status, created in rows:
        log = events.setdefault(str(sid), [[], [], {}, []])
        log[0].append(seq)
        log[1].append(kind)
        if kind == "status":
            log[2][seq] = status or ""
        log[3].append(created.timestamp())
    sessions = {str(pk): {"status": status, "last_seq": last, "mode": mode}
                for pk, status, last, mode in Session.objects.values_list("pk", "status", "last_seq", "mode")}
    takeovers = dict(Event.objects.filter(kind="status", content__startswith="Taken over").values("session_id")
                     .annotate(n=Count("pk")).values_list("session_id", "n"))
    failed = {str(sid): error for sid, error in Run.objects.filter(status=Run.Status.FAILED).values_list("session_id", "error")}
    runs = dict(Run.objects.values("status").annotate(n=Count("pk")).values_list("status", "n"))
    return {"events": events, "sessions": sessions, "takeovers": {str(k): v for k, v in takeovers.items()},
            "failed": failed, "runs": runs}


def _helper_main(conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops the helper itself
    serve_django_requests(conn, {
        "setup": lambda token, users: login_users(token, users, name="load"),
        "status": _helper_status,
        "log": _helper_log,
    })


class Helper(PipeHelper):
    def __init__(self) -> None:
        super().__init__(_helper_main, "load-helper")


# --- errors -----------------------------------------------------------------------------------------


class Errors:
    """Errors by kind, with the first few examples of each."""

    EXAMPLES = 5

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, detail: str = "", n: int = 1) -> None:
        if n <= 0:
            return
        self.counts[kind] += n
        if detail and len(self.examples.setdefault(kind, [])) < self.EXAMPLES:
            self.examples[kind].append(detail[:400])

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --- the clients ------------------------------------------------------------------------------------


class LiveSession(SessionSocket):
    """One session as a person's browser tab sees it: Start, its page, its socket, Continue, Cancel."""

    CLOSE_WAIT_S = 5.0

    def __init__(self, load: Load, slot: int, n: int) -> None:
        super().__init__(load.ports[slot % len(load.ports)], load.cookies[slot])
        self.load, self.slot, self.n = load, slot, n
        self.mode, self.budget = MIX[n % len(MIX)]
        # Every event that arrived, in arrival order: seq, kind, monotonic ns; the first page_n came with the page.
        self.seqs: list[int] = []
        self.kinds: list[str] = []
        self.times: list[int] = []
        self.page_n = 0
        self.last_status = ""
        self.ends: asyncio.Queue[str] = asyncio.Queue()
        self.continues = 0
        self.cancel_asked = False
        self.gave_up = False
        self.t_last = time.monotonic()

    # HTTP, as the browser does it

    async def _request(self, what: str, method: str, path: str, form: dict | None = None,
                       headers: dict | None = None) -> tuple[int, list, bytes] | None:
        try:
            answer = await asyncio.wait_for(http(self.port, method, path, self.cookies, form, headers), HTTP_TIMEOUT_S)
        except (OSError, TimeoutError, ConnectionError, ValueError, IndexError) as exc:
            self.load.errors.add(f"http {what}: no answer", f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        self.load.requests[what] += 1
        if not 200 <= answer[0] < 400:
            self.load.errors.add(f"http {what}: {answer[0]}", f"{method} {path} -> {answer[0]}: {answer[2][:300]!r}")
            return None
        return answer

    async def start(self) -> bool:
        form = {"task": TASK.format(n=self.n), "mode": self.mode, "title": "", "max_rounds": str(self.budget or ""),
                "auto_continue": "0", "csrfmiddlewaretoken": self.load.csrf}
        answer = await self._request("start", "POST", "/sessions/new/", form)
        if answer is None:
            return False
        location = dict(answer[1]).get("Location", "")
        if answer[0] != 302 or not location.startswith("/sessions/"):
            self.load.errors.add("start refused", f"{answer[0]} {location!r}: {re.sub(rb'<[^>]+>', b' ', answer[2])[-300:]!r}")
            return False
        self.session_id = location.strip("/").split("/")[-1]
        if self.load.page:
            page = await self._request("page", "GET", location)
            if page is None:
                return False
            self._arrived(time.monotonic_ns(), page[2])
            self.page_n = len(self.seqs)
        await self._connect()
        return True

    async def _action(self, action: str) -> bool:
        """Continue or Cancel as the page's htmx button does: 204, or 200 with why not."""
        form = {"csrfmiddlewaretoken": self.load.csrf}
        answer = await self._request(action, "POST", f"/sessions/{self.session_id}/{action}/", form,
                                     {"HX-Request": "true", "HX-Current-URL": f"http://{HOST}:{self.port}/sessions/{self.session_id}/"})
        if answer is None:
            return False
        if answer[0] != 204:
            self.load.errors.add(f"{action} refused", f"session {self.session_id[:8]}: {answer[0]} {answer[2][:300]!r}")
            return False
        return True

    async def continue_(self) -> bool:
        self.continues += 1
        self.load.continued += 1
        return await self._action("continue")

    async def cancel(self) -> bool:
        self.cancel_asked = True
        return await self._action("cancel")

    # the socket, as the page's script does it

    def stopped(self) -> bool:
        return self.closing or self.gave_up

    def last_seq(self) -> int:
        return max(self.seqs, default=0)

    def connect_failed(self, exc: OSError) -> None:
        self.load.errors.add("socket connect failed", f"session {self.session_id[:8]}: {exc}")
        self._retry(str(exc))

    def give_up(self, why: str) -> None:
        self.gave_up = True
        self.load.errors.add("socket gave up", f"session {self.session_id[:8]}: {self.MAX_RECONNECTS} reconnects; last: {why}")
        self.ends.put_nowait("gave_up")

    def on_message(self, t: int, payload: bytes) -> None:
        if SOCKET_ERROR in payload:
            self.load.errors.add("socket error frame", f"session {self.session_id[:8]}: {payload[:300]!r}")
        self._arrived(t, payload)

    def _arrived(self, t: int, payload: bytes) -> None:
        for seq, kind, _agent, inner in ARTICLE_RE.findall(payload):
            kind_s = kind.decode()
            self.seqs.append(int(seq))
            self.kinds.append(kind_s)
            self.times.append(t)
            if kind_s == "status":
                m = BADGE_RE.search(inner)
                status = m.group(1).decode() if m else ""
                self.last_status = status
                if status in ENDS:
                    self.ends.put_nowait(status)
        self.t_last = time.monotonic()

    def on_close(self, code: int | None, reason: str | None) -> None:
        self.closed()
        if self.closing:
            return
        self.load.errors.add("socket closed unasked", f"session {self.session_id[:8]}: code {code} ({reason})")
        if code in REFUSALS:
            self.gave_up = True
            self.ends.put_nowait("refused")
        else:
            self._retry(f"closed with code {code} ({reason})")


# --- the test ---------------------------------------------------------------------------------------


@dataclass
class Options:
    sessions: int = 200
    minutes: float = 10.0
    latency: float = 2.0
    servers: int = 2
    workers: int = 2
    ramp: float = 60.0  # seconds over which the sessions are first Started, evenly
    settle: float = 30.0  # seconds after the ramp before the window opens (the warm-up is ramp + settle)
    drain: float = 90.0  # seconds after the window for live sessions to end by themselves; the rest are cancelled
    page: bool = True

    @property
    def window_s(self) -> float:
        return self.minutes * 60

    @property
    def hard_limit_s(self) -> float:
        return 900 + self.ramp + self.settle + self.window_s + self.drain


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 3:
        return math.nan
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return 60 * sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else math.nan


class Load:
    def __init__(self, opts: Options, ports: list[int], cookies: list[dict], csrf: str, helper: Helper,
                 servers: list[LoggedProcess], workers: list[LoggedProcess], db_name: str) -> None:
        self.opts, self.ports, self.cookies, self.csrf, self.helper = opts, ports, cookies, csrf, helper
        self.servers, self.workers, self.db_name = servers, workers, db_name
        self.page = opts.page
        self.errors = Errors()
        self.requests: collections.Counter[str] = collections.Counter()
        self.sessions: list[LiveSession] = []
        self.started = 0
        self.continued = 0
        self.stop_starting = False
        self.live: set[LiveSession] = set()
        self.t0 = time.monotonic()
        self.window: tuple[float, float] = (math.inf, math.inf)  # monotonic s
        self.rss: list[tuple[float, dict[str, float]]] = []  # (monotonic s, process -> MiB)
        self.runs_rss: list[tuple[float, int, float, float]] = []  # (t, run processes, their MiB, largest)
        self.status: list[tuple[float, dict]] = []
        self.seen_runs: set[int] = set()
        self.launchers: dict[int, int] = {}
        self.cpu: dict[str, float] = {}
        self.redis_pids = pids_matching(lambda c: c.startswith("redis-server"))
        # PostgreSQL backends of this test's database, sampled each second in the window: pid -> [CPU s at the
        # window's start or at birth (0), CPU s last seen]. A backend born and gone between samples is missed.
        self.pg_cpu: dict[int, list[float]] = {}
        self.pg_sampling = False

    # the processes watched

    def processes(self) -> dict[str, int]:
        procs = {s.name: s.pid for s in self.servers} | {w.name: w.pid for w in self.workers}
        by_worker = {pid: name for name, pid in procs.items()}
        for launcher, worker in self.launchers.items():
            procs[f"{by_worker.get(worker, worker)} launcher"] = launcher
        return procs

    def sample_rss(self) -> None:
        if len(self.launchers) < len(self.workers):
            self.launchers = launchers_of([w.pid for w in self.workers])
        self.rss.append((time.monotonic(), {name: rss_mib(pid) for name, pid in self.processes().items()}))

    def sample_runs(self) -> None:
        launchers = set(self.launchers)
        kids = []
        for pid in all_pids():
            f = proc_stat(pid)
            if f is not None and int(f[1]) in launchers:
                kids.append(pid)
        self.seen_runs.update(kids)
        sizes = [rss_mib(pid) for pid in kids]
        self.runs_rss.append((time.monotonic(), len(kids), sum(sizes), max(sizes, default=0.0)))

    def sample_pg_cpu(self, *, first: bool = False) -> None:
        mark = f" {self.db_name} "
        for pid in pids_matching(lambda c: c.startswith("postgres:") and mark in c):
            now = cpu_s(pid)
            if pid in self.pg_cpu:
                self.pg_cpu[pid][1] = max(self.pg_cpu[pid][1], now)
            else:
                self.pg_cpu[pid] = [now if first else 0.0, now]

    def read_cpu(self) -> dict[str, float]:
        workers = [w.pid for w in self.workers]
        me = os.times()
        return {
            "machine": machine_busy_s(),
            "servers": sum(cpu_s(s.pid) for s in self.servers),
            "workers": sum(cpu_s(pid) for pid in workers),
            "runs": runs_cpu_s(workers),
            "redis": sum(cpu_s(p) for p in self.redis_pids),
            "clients": me.user + me.system,
        }

    async def watch(self) -> None:
        """RSS every second, the run processes every 5 s, the run queue every 5 s, progress every 30 s."""
        loop = asyncio.get_running_loop()
        next_runs = next_status = 0.0
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while True:
            now = time.monotonic()
            self.sample_rss()
            if self.pg_sampling:
                self.sample_pg_cpu()
            for w in [*self.servers, *self.workers]:
                if w.process.poll() is not None and f"{w.name} died" not in self.errors.counts:
                    self.errors.add(f"{w.name} died", f"exit {w.process.returncode}:\n{w.tail(20)}")
            if now >= next_runs:
                self.sample_runs()
                next_runs = now + RUNS_EVERY_S
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                try:
                    self.status.append((now, await loop.run_in_executor(None, self.helper.request, "status")))
                except Exception as exc:  # noqa: BLE001 - a diagnostic only
                    self.errors.add("helper status failed", str(exc))
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.progress()
            await asyncio.sleep(RSS_EVERY_S)

    def delivered_between(self, a: float, b: float) -> int:
        lo, hi = int(a * 1e9), int(b * 1e9)
        return sum(len({s for s, t in zip(x.seqs, x.times) if lo <= t < hi}) for x in self.sessions)

    def progress(self) -> None:
        now = time.monotonic()
        recent = self.delivered_between(now - PROGRESS_EVERY_S, now)
        st = self.status[-1][1] if self.status else {}
        rss = self.rss[-1][1] if self.rss else {}
        phase = ("ramp" if now < self.t0 + self.opts.ramp else "settle" if now < self.window[0]
                 else "window" if now < self.window[1] else "drain")
        mem = ", ".join(f"{k} {v:.0f}" for k, v in rss.items() if "launcher" not in k)
        print(f"[{now - self.t0:5.0f} s {phase}] live {len(self.live)}, started {self.started}, continued "
              f"{self.continued}; {recent / PROGRESS_EVERY_S:.0f} events/s; errors {self.errors.total}; runs queued "
              f"{st.get('queued', '?')}, running {st.get('running', '?')}, oldest lease {st.get('lease_age', 0):.0f} s, "
              f"PG conns {st.get('connections', '?')}; load {os.getloadavg()[0]:.1f}; RSS MiB {mem}",
              file=sys.stderr, flush=True)

    # the people

    async def person(self, slot: int) -> None:
        await asyncio.sleep(slot * self.opts.ramp / self.opts.sessions)
        while not self.stop_starting:
            n = self.started
            self.started += 1
            s = LiveSession(self, slot, n)
            self.sessions.append(s)
            self.live.add(s)
            try:
                if await s.start():
                    await self.follow(s)
                else:
                    await asyncio.sleep(2.0)  # counted; try again, as a person would
            finally:
                self.live.discard(s)
                await s.close()

    async def follow(self, s: LiveSession) -> None:
        """Until the session ends: Continue each pause (until the window closes); an odd end is an error."""
        while True:
            try:
                status = await asyncio.wait_for(s.ends.get(), STALL_S)
            except TimeoutError:
                if time.monotonic() - s.t_last < STALL_S:
                    continue
                self.errors.add("session stalled", f"session {s.session_id[:8]} ({s.mode}): no event for {STALL_S:.0f} s "
                                f"after seq {max(s.seqs, default=0)}, last status {s.last_status!r}")
                if not s.cancel_asked and await s.cancel():
                    continue  # wait for its "cancelled"
                return
            if s.cancel_asked:
                if status in ("cancelled", "completed"):
                    return  # cancelled as asked, or it finished first
                if status == "paused":
                    continue  # it paused just before the Cancel: its "cancelled" follows
            elif status == "paused":
                if self.stop_starting:
                    return  # left paused: the window is over
                if not await s.continue_():
                    return
                continue
            if status != "completed":
                self.errors.add(f"session {status}", f"session {s.session_id[:8]} ({s.mode}), seq {max(s.seqs, default=0)}")
            return

    async def run(self) -> None:
        opts = self.opts
        watcher = asyncio.get_running_loop().create_task(self.watch())
        self.t0 = time.monotonic()
        self.window = (self.t0 + opts.ramp + opts.settle, self.t0 + opts.ramp + opts.settle + opts.window_s)
        people = [asyncio.get_running_loop().create_task(self.person(i)) for i in range(opts.sessions)]
        try:
            await asyncio.sleep(self.window[0] - time.monotonic())
            self.sample_rss()
            self.sample_runs()
            self.cpu_start = self.read_cpu()
            self.sample_pg_cpu(first=True)
            self.pg_sampling = True
            print(f"[{time.monotonic() - self.t0:5.0f} s] window opens ({opts.minutes:g} min)", file=sys.stderr, flush=True)
            await asyncio.sleep(self.window[1] - time.monotonic())
            self.sample_rss()
            self.sample_runs()
            end = self.read_cpu()
            self.sample_pg_cpu()
            self.pg_sampling = False
            self.cpu = {k: end[k] - self.cpu_start[k] for k in end}
            self.cpu["postgres"] = sum(last - first for first, last in self.pg_cpu.values())
            self.stop_starting = True
            print(f"[{time.monotonic() - self.t0:5.0f} s] window closed; draining {len(self.live)} live sessions "
                  f"(up to {opts.drain:.0f} s)", file=sys.stderr, flush=True)
            _, pending = await asyncio.wait(people, timeout=opts.drain)
            if pending:
                left = [s for s in self.live if not s.cancel_asked]
                print(f"[{time.monotonic() - self.t0:5.0f} s] cancelling {len(left)} sessions still live",
                      file=sys.stderr, flush=True)
                await asyncio.gather(*(s.cancel() for s in left))
                _, pending = await asyncio.wait(pending, timeout=60)
                for s in self.live:
                    self.errors.add("session did not end", f"session {s.session_id[:8]} ({s.mode}): last status "
                                    f"{s.last_status!r} after drain and cancel")
        finally:
            for task in [*people, watcher]:
                task.cancel()
            await asyncio.gather(*people, watcher, return_exceptions=True)
            await asyncio.gather(*(s.close() for s in self.sessions if s.proto is not None), return_exceptions=True)


# --- checking against the database, and the figures -----------------------------------------------


def check(load: Load, log: dict, offset_ns: int) -> dict:
    """Every session's arrivals against its rows; push latencies in the window."""
    lost = duplicated = reordered = differing = 0
    latencies: list[float] = []
    lo, hi = (int(x * 1e9) for x in load.window)
    wall_lo, wall_hi = ((x + offset_ns) / 1e9 for x in (lo, hi))
    waits: list[float] = []  # seconds from a run's "queued" to its "running" (claimed), for runs queued in the window
    delivered = 0
    by_session = {s.session_id: s for s in load.sessions if s.session_id}
    for sid, s in by_session.items():
        rows = log["events"].get(sid)
        if rows is None:
            load.errors.add("session missing from the database", sid)
            continue
        seqs, kinds, statuses, created = rows
        row_of = {seq: i for i, seq in enumerate(seqs)}
        if seqs != list(range(1, len(seqs) + 1)):
            load.errors.add("log has gaps", f"session {sid[:8]}: seqs {seqs[:5]}... ({len(seqs)} rows, last {seqs[-1]})")
        got = s.seqs
        ended = s.last_status in ENDS and not s.gave_up
        due = set(seqs) if ended else {q for q in seqs if q <= max(got, default=0)}
        s_lost = len(due - set(got))
        s_dup = len(got) - len(set(got))
        s_reord = sum(1 for a, b in zip(got, got[1:]) if b < a)
        s_diff = sum(1 for q, k in zip(got, s.kinds) if q not in row_of or kinds[row_of[q]] != k)
        if s_lost or s_dup or s_reord or s_diff:
            load.errors.add("delivery", f"session {sid[:8]} ({s.mode}, status {log['sessions'].get(sid, {}).get('status')}): "
                            f"lost {s_lost}, duplicated {s_dup}, reordered {s_reord}, differing {s_diff}; "
                            f"received {len(got)} of {len(seqs)} rows, {s.reconnects} reconnects")
        lost, duplicated, reordered, differing = lost + s_lost, duplicated + s_dup, reordered + s_reord, differing + s_diff
        queued_at = None
        for q, created_at in zip(seqs, created):
            status = statuses.get(q)
            if status == "queued":
                queued_at = created_at
            elif status == "running" and queued_at is not None:
                if wall_lo <= queued_at < wall_hi:
                    waits.append(created_at - queued_at)
                queued_at = None
        seen: set[int] = set()
        for i, (q, t) in enumerate(zip(got, s.times)):
            if lo <= t < hi and q not in seen:
                delivered += 1
                seen.add(q)
                if i >= s.page_n and q in row_of:
                    latencies.append(((t + offset_ns) / 1e9 - created[row_of[q]]) * 1000)
    for kind, n in (("lost", lost), ("duplicated", duplicated), ("reordered", reordered), ("differing", differing)):
        load.errors.add(f"events {kind}", n=n)
    for sid, n in log["takeovers"].items():
        load.errors.add("run taken over (lease lapsed)", f"session {sid[:8]}: {n} time(s)", n=n)
    for sid, error in log["failed"].items():
        if sid in by_session and not by_session[sid].cancel_asked:
            load.errors.add("run failed", f"session {sid[:8]}: {error}")
    return {"lost": lost, "duplicated": duplicated, "reordered": reordered, "differing": differing,
            "delivered": delivered, "latencies": latencies, "queue_waits": waits}


def scan_logs(load: Load) -> dict:
    """Tracebacks, ERROR lines and lease troubles in the server and worker logs."""
    found = {}
    for p in [*load.servers, *load.workers]:
        text = p.text()
        tracebacks = text.count("Traceback (most recent call last)")
        crashed = text.count("Exception inside application")
        errors = LOG_ERROR_RE.findall(text)
        lease = LOG_LEASE_RE.findall(text)
        warnings = text.count(" WARNING ")
        load.errors.add(f"{p.name} log: tracebacks", p.log.name, n=tracebacks)
        load.errors.add(f"{p.name} log: Exception inside application", p.log.name, n=crashed)
        for level, name, message in errors:
            load.errors.add(f"{p.name} log: {level} lines", f"{name}: {message}")
        load.errors.add(f"{p.name} log: lease trouble", ", ".join(sorted(set(lease))), n=len(lease))
        found[p.name] = {"tracebacks": tracebacks, "exception_inside_application": crashed, "error_lines": len(errors),
                         "lease_lines": len(lease), "warning_lines": warnings}
    return found


def memory(load: Load) -> dict:
    """Per process: idle (before the ramp), start and end of the window, peak in it, slopes."""
    a, b = load.window
    out = {}
    names = list(load.rss[-1][1]) if load.rss else []
    for name in names:
        series = [(t, v[name]) for t, v in load.rss if name in v and v[name] > 0]
        inside = [(t - a, m) for t, m in series if a <= t <= b + 0.5]
        if not inside:
            continue
        half = [(t, m) for t, m in inside if t >= (b - a) / 2]
        out[name] = {
            "idle": series[0][1], "start": inside[0][1], "end": inside[-1][1], "peak": max(m for _, m in inside),
            "slope_mib_per_min": _slope(inside), "slope_2nd_half_mib_per_min": _slope(half),
        }
    runs = [(t, n, total, big) for t, n, total, big in load.runs_rss if a <= t <= b + 0.5]
    if runs:
        out["run processes"] = {
            "count_start": runs[0][1], "count_end": runs[-1][1], "count_peak": max(r[1] for r in runs),
            "start": runs[0][2], "end": runs[-1][2], "peak": max(r[2] for r in runs), "largest": max(r[3] for r in runs),
            "per_process_mean": sum(r[2] for r in runs) / max(1, sum(r[1] for r in runs)),
            "seen": len(load.seen_runs),
        }
    return out


def flat(m: dict, minutes: float) -> str:
    """Flat: the window's least-squares growth is under 10 % of its start, or its second half does not grow."""
    growth = m["slope_mib_per_min"] * minutes
    if not growth == growth:  # NaN: too short to say
        return "?"
    if growth <= 0.10 * m["start"] or m["slope_2nd_half_mib_per_min"] <= 0.5:
        return "flat"
    return "GROWING"


def report(res: dict) -> None:
    o = res["options"]
    for line in res["header"]:
        print(line)
    print()
    lat = res["latency_ms"]
    print(f"events delivered in the window: {res['events']:,} in {res['window_s']:.0f} s = {res['events_per_s']:.1f}/s "
          f"({res['sessions_started']:,} sessions started, {res['continues']:,} Continues, "
          f"{res['sessions_completed']:,} completed)")
    print(f"push latency (row created -> fragment at the client), {lat['n']:,} socket fragments: p50 {lat['p50']:.1f} ms, "
          f"p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
    c = res["check"]
    print(f"delivery against the database: lost {c['lost']}, duplicated {c['duplicated']}, reordered {c['reordered']}, "
          f"differing {c['differing']} (every session, window and drain)")
    q = res["queue"]
    print(f"runs: {q['running_mean']:.0f} running on average (at most {q['running_max']}) and {q['queued_mean']:.0f} "
          f"queued (at most {q['queued_max']}); queued -> claimed p50 {q['wait_p50_s']:.1f} s, p99 {q['wait_p99_s']:.1f} s, "
          f"max {q['wait_max_s']:.1f} s ({q['waits']:,} runs queued in the window)")
    print(f"leases: oldest renewal among running runs "
          f"{q['lease_age_max']:.0f} s (lease {q['lease_s']} s), {q['lapsed_max']} lapsed at worst; PostgreSQL "
          f"connections at most {q['connections_max']}")
    print()
    print(f"errors: {res['errors_total']}" + (" (goal: none)" if res["errors_total"] else " (goal: none: met)"))
    if res["errors"]:
        print_table(["kind", "count", "first example"],
                    [[k, str(n), (res["error_examples"].get(k) or [""])[0][:140]] for k, n in sorted(res["errors"].items())])
    print()
    rows = []
    for name, m in res["rss"].items():
        if name == "run processes":
            continue
        rows.append([name, f"{m['idle']:.1f}", f"{m['start']:.1f}", f"{m['end']:.1f}", f"{m['end'] - m['start']:+.1f}",
                     f"{m['peak']:.1f}", f"{m['slope_mib_per_min']:+.2f}", f"{m['slope_2nd_half_mib_per_min']:+.2f}",
                     flat(m, o["minutes"])])
    print("RSS (MiB): idle = before the ramp; start and end of the window; slope of the 1 s samples (MiB/min)")
    print_table(["process", "idle", "start", "end", "end-start", "peak", "slope", "2nd half", "verdict"], rows)
    r = res["rss"].get("run processes")
    if r:
        print(f"run processes: {r['count_start']} at the start, {r['count_end']} at the end, {r['count_peak']} at most; "
              f"{r['start']:.0f} -> {r['end']:.0f} MiB together (peak {r['peak']:.0f}), {r['per_process_mean']:.0f} MiB "
              f"each on average, largest {r['largest']:.0f}; {r['seen']:,} seen in all")
    print()
    cpu = res["cpu_s"]
    span = res["window_s"] * res["machine"]["cpus"]
    print(f"CPU in the window ({res['machine']['cpus']} CPUs x {res['window_s']:.0f} s = {span:.0f} CPU s):")
    kinds = ["servers", "workers", "runs", "postgres", "redis", "clients", "other"]
    print_table(["", *kinds, "machine"],
                [["CPU s", *(f"{cpu.get(k, 0):.0f}" for k in kinds), f"{cpu.get('machine', 0):.0f}"],
                 ["% of machine", *(f"{100 * cpu.get(k, 0) / span:.0f}" for k in kinds), f"{100 * cpu.get('machine', 0) / span:.0f}"],
                 ["ms per event", *(f"{1000 * cpu.get(k, 0) / max(res['events'], 1):.2f}" for k in kinds),
                  f"{1000 * cpu.get('machine', 0) / max(res['events'], 1):.2f}"]])


# --- main ---------------------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGTERM or the hard time limit: stopped like Ctrl-C (asyncio lets only these through its callbacks)."""


def _raise(signum, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse() -> tuple[Options, argparse.Namespace]:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=d.sessions, help=f"concurrent sessions (default {d.sessions})")
    p.add_argument("--minutes", type=float, default=d.minutes, help=f"measurement window (default {d.minutes:g})")
    p.add_argument("--latency", type=float, default=d.latency, help=f"offline model seconds per reply (default {d.latency:g})")
    p.add_argument("--servers", type=int, default=d.servers, help=f"serve --no-worker processes (default {d.servers})")
    p.add_argument("--workers", type=int, default=d.workers, help=f"runworker processes (default {d.workers})")
    p.add_argument("--ramp", type=float, default=d.ramp, help=f"seconds to Start the first sessions over (default {d.ramp:g})")
    p.add_argument("--settle", type=float, default=d.settle, help=f"seconds between the ramp and the window (default {d.settle:g})")
    p.add_argument("--drain", type=float, default=d.drain, help=f"seconds for sessions to end after the window (default {d.drain:g})")
    p.add_argument("--no-page", action="store_true", help="open the socket without loading the session page first")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, run folders)")
    args = p.parse_args()
    opts = Options(sessions=args.sessions, minutes=args.minutes, latency=args.latency, servers=args.servers,
                   workers=args.workers, ramp=args.ramp, settle=args.settle, drain=args.drain, page=not args.no_page)
    if opts.sessions < 1 or opts.servers < 1 or opts.workers < 1 or opts.minutes <= 0:
        p.error("--sessions, --servers, --workers and --minutes must be positive")
    return opts, args


def main() -> int:
    opts, args = parse()
    started = time.monotonic()
    load_before = os.getloadavg()
    token = secrets.token_hex(4)
    admin_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    db_name = f"cmbagent_load_{os.getpid()}"
    prefix = f"load{token}"
    tmp = Path(tempfile.mkdtemp(prefix="load-bench-"))
    procs: list[LoggedProcess] = []
    helper: Helper | None = None
    rconn = None
    created_db = False
    saved_env = dict(os.environ)
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGALRM, _raise)
    signal.alarm(int(opts.hard_limit_s))  # the hard limit: everything is stopped and removed even then
    try:
        import redis

        try:
            rconn = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
            rconn.ping()
            pg_database(admin_url, db_name, create=True)
            created_db = True
            pg = pg_settings(admin_url)
        except Exception as exc:  # noqa: BLE001 - cannot run without them
            print(f"load: needs PostgreSQL ({admin_url}) and Redis ({redis_url}): {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        db_url = admin_url.rsplit("/", 1)[0] + "/" + db_name
        per_worker = math.ceil(opts.sessions * 1.25 / opts.workers) + 2
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CHANNELS_PREFIX")}
        env.update({
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE") or "cmbagent_site.settings",
            "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
            "DEBUG": "0",
            "DATABASE_URL": db_url, "REDIS_URL": redis_url, "CHANNELS_PREFIX": prefix, "EMBEDDED_WORKER": "0",
            "CMBAGENT_VAR_DIR": str(tmp / "var"),
            "CMBAGENT_MODEL_PROVIDER": "offline", "CMBAGENT_OFFLINE_LATENCY": str(opts.latency),
            "WORKER_MAX_RUNS": str(per_worker),
            "PYTHONUNBUFFERED": "1",
        })
        os.environ.clear()
        os.environ.update(env)  # the helper is spawned with it
        print(f"load: {opts.sessions} sessions, {opts.minutes:g} min, in {tmp}; database {db_name}, Redis prefix {prefix}",
              file=sys.stderr, flush=True)
        migrate(env)
        helper = Helper()
        fx = helper.request("setup", token, opts.sessions)
        ports = [free_port() for _ in range(opts.servers)]
        servers = [LoggedProcess(f"server{i + 1}", [sys.executable, "manage.py", "serve", "--no-worker", "--host", HOST,
                                                    "--port", str(port)], env, tmp / f"server{i + 1}.log")
                   for i, port in enumerate(ports)]
        procs += servers
        workers = [LoggedProcess(f"worker{i + 1}", [sys.executable, "manage.py", "runworker", "orchestrator"], env,
                                 tmp / f"worker{i + 1}.log") for i in range(opts.workers)]
        procs += workers
        for s in servers:
            s.wait_for("Serving on")
        for w in workers:
            w.wait_for("serving (up to", timeout=120)
        offset_ns = time.time_ns() - time.monotonic_ns()  # the clients' clock onto the rows' created_at

        async def go() -> Load:
            csrf_cookie, csrf = await csrf_token(ports[0], {"sessionid": fx["cookies"][0]})
            cookies = [{"sessionid": c, "csrftoken": csrf_cookie} for c in fx["cookies"]]
            load = Load(opts, ports, cookies, csrf, helper, servers, workers, db_name)
            load.sample_rss()  # idle
            await load.run()
            return load

        load = asyncio.run(go())
        drift_ms = (time.time_ns() - time.monotonic_ns() - offset_ns) / 1e6
        print(f"[{time.monotonic() - load.t0:5.0f} s] reading the log back", file=sys.stderr, flush=True)
        log = helper.request("log")
        checked = check(load, log, offset_ns)
        logs = scan_logs(load)
        lat = checked["latencies"]
        statuses = [(t, s) for t, s in load.status if load.window[0] <= t <= load.window[1]] or load.status
        cpu = dict(load.cpu)
        cpu["other"] = cpu.get("machine", 0) - sum(v for k, v in cpu.items() if k != "machine")
        cpus = os.cpu_count() or 1
        load_after = os.getloadavg()
        res = {
            "bench": "load.py",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "options": {**opts.__dict__, "mix": [list(m) for m in MIX], "worker_max_runs": per_worker},
            "machine": {"cpus": cpus, "python": platform.python_version(), "versions": versions(), "postgres": pg,
                        "load_before": load_before, "load_after": load_after, "platform": platform.platform()},
            "window_s": opts.window_s,
            "sessions": opts.sessions,
            "minutes": opts.minutes,
            "sessions_started": load.started,
            "sessions_completed": sum(1 for s in log["sessions"].values() if s["status"] == "completed"),
            "sessions_by_status": dict(collections.Counter(s["status"] for s in log["sessions"].values())),
            "runs_by_status": log["runs"],
            "continues": load.continued,
            "requests": dict(load.requests),
            "reconnects": sum(s.reconnects for s in load.sessions),
            "events": checked["delivered"],
            "events_per_s": checked["delivered"] / opts.window_s,
            "events_in_db": sum(len(v[0]) for v in log["events"].values()),
            "latency_ms": {"n": len(lat), "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                           "max": max(lat, default=math.nan), "negative": sum(1 for x in lat if x < 0),
                           "clock": "client time.monotonic_ns() + (time.time_ns() - monotonic_ns()) at start vs the row's "
                                    f"created_at; offset drift over the test {drift_ms:+.1f} ms"},
            "check": {k: v for k, v in checked.items() if k not in ("latencies", "queue_waits")},
            "errors_total": 0,
            "errors": {},
            "error_examples": {},
            "logs": logs,
            "rss": memory(load),
            "rss_series": [{"t": round(t - load.t0, 1), **{k: round(v, 1) for k, v in m.items()}} for t, m in load.rss[::5]],
            "runs_series": [{"t": round(t - load.t0, 1), "count": n, "mib": round(mib, 1)} for t, n, mib, _ in load.runs_rss],
            "cpu_s": cpu,
            "queue": {"queued_mean": sum(s["queued"] for _, s in statuses) / max(1, len(statuses)),
                      "running_mean": sum(s["running"] for _, s in statuses) / max(1, len(statuses)),
                      "waits": len(checked["queue_waits"]), "wait_p50_s": pct(checked["queue_waits"], 50),
                      "wait_p99_s": pct(checked["queue_waits"], 99), "wait_max_s": max(checked["queue_waits"], default=math.nan),
                      "queued_max": max((s["queued"] for _, s in statuses), default=0),
                      "running_max": max((s["running"] for _, s in statuses), default=0),
                      "lease_age_max": max((s["lease_age"] for _, s in statuses), default=0.0),
                      "lapsed_max": max((s["lapsed"] for _, s in statuses), default=0),
                      "connections_max": max((s["connections"] for _, s in load.status), default=0),
                      "lease_s": int(env.get("WORKER_LEASE_SECONDS", "30"))},
            "status_series": [{"t": round(t - load.t0, 1), **s} for t, s in load.status],
            "duration_s": time.monotonic() - started,
        }
        res["errors_total"] = load.errors.total
        res["errors"] = dict(load.errors.counts)
        res["error_examples"] = load.errors.examples
        busy = load_before[0] > 0.5 * cpus
        res["header"] = [
            f"Load: {opts.sessions} concurrent sessions for {opts.minutes:g} min on PostgreSQL + Redis, loopback "
            f"({datetime.date.today().isoformat()})",
            f"{opts.servers} x `manage.py serve --no-worker` + {opts.workers} x `runworker orchestrator` "
            f"(WORKER_MAX_RUNS={per_worker}), DEBUG off; {pg}; channels_redis at {redis_url}",
            f"offline model, {opts.latency:g} s per reply; modes cycled: "
            + ", ".join(f"{m}{f' (budget {b}, Continued)' if b else ''}" for m, b in MIX)
            + f"; one user per session; {'page GET, then ' if opts.page else ''}socket with hello",
            f"ramp {opts.ramp:g} s, settle {opts.settle:g} s, window {opts.minutes:g} min, drain up to {opts.drain:g} s; "
            f"total {res['duration_s'] / 60:.1f} min",
            f"{cpus} CPUs, Python {platform.python_version()}, {versions()}",
            f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
            + ("; NOTE: the machine was busy before the test, the figures include that contention" if busy else ""),
        ]
        report(res)
        ok = res["errors_total"] == 0
        headline(
            "load.py",
            f"{opts.sessions} concurrent sessions for {opts.minutes:g} min, offline model {opts.latency:g} s/reply, "
            f"{opts.servers} servers + {opts.workers} workers on PostgreSQL + Redis",
            f"{res['events_per_s']:.0f} events/s delivered; push p50 {res['latency_ms']['p50']:.0f} ms, p99 "
            f"{res['latency_ms']['p99']:.0f} ms; errors {res['errors_total']}; RSS "
            + ", ".join(f"{k} {m['start']:.0f}->{m['end']:.0f} MiB" for k, m in res["rss"].items()
                        if k != "run processes" and "launcher" not in k),
            "no errors; server and worker RSS flat",
            "met" if ok and all(flat(m, opts.minutes) == "flat" for k, m in res["rss"].items() if k != "run processes")
            else "MISSED",
        )
        if args.json:
            args.json.write_text(json.dumps(res, indent=1, default=str))
            print(f"\nwrote {args.json}")
        return 0 if ok else 1
    except KeyboardInterrupt as exc:
        print(f"\nload: stopped ({type(exc).__name__} {exc}); cleaning up", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if helper is not None:
            helper.stop()
        # Run processes die with their launcher, which dies with its worker; any left are ended here, by pid.
        launchers = launchers_of([p.pid for p in procs])
        children = [pid for pid in all_pids() if (proc_stat(pid) or [b"", b"0"])[1] in {str(x).encode() for x in launchers}]
        for p in procs:
            p.stop()
        for pid in [*children, *launchers]:
            if "multiprocessing" in cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        os.environ.clear()
        os.environ.update(saved_env)
        if created_db:
            try:
                pg_database(admin_url, db_name, create=False)
            except Exception as exc:  # noqa: BLE001
                print(f"load: could not drop database {db_name}: {exc}", file=sys.stderr)
        if rconn is not None:
            try:
                keys = list(rconn.scan_iter(match=f"{prefix}*", count=1000))
                if keys:
                    rconn.delete(*keys)
            except Exception as exc:  # noqa: BLE001
                print(f"load: could not delete the Redis keys {prefix}*: {exc}", file=sys.stderr)
        if args.keep:
            print(f"load: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
