#!/usr/bin/env python
"""Push latency: from an event's commit to its fragment at a WebSocket client.

One run measures, for 1 and for N (default 50) concurrent live sessions:

* app:  sessions.services.event_append (as the run worker calls it) commits an
        Event row; its after-commit note goes through Redis to a real Daphne
        process (``manage.py serve --no-worker``), whose SessionConsumer reads
        the rows, renders the fragment and sends it to the client;
* bare: a group_send through the same Redis to a second Daphne process serving
        bench/bare_app.py, a consumer that sends the same fragment bytes with
        no database, no rendering, no auth;

and prints p50/p99 of both and the ratio of the p99s (target: app p99 within
2x of the bare consumer's). See bench/README.md for the method and caveats.

    .venv/bin/python bench/push_latency.py            # full run, about 60 s
    .venv/bin/python bench/push_latency.py --quick    # about 20 s

Needs Redis (REDIS_URL, default redis://127.0.0.1:6379/0). Uses a throwaway
SQLite database in a temp dir unless DATABASE_URL is set (then it writes a
bench user and its sessions into that database).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.support import HOST, LoggedProcess, PipeHelper, autobahn_client, free_port, headline  # noqa: E402 - needs ROOT on the path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SEQ_RE = re.compile(rb'data-seq="(\d+)"')
SEQ_MARK = "\x00seq\x00"  # the placeholder bench/bare_app.py fills in
READY_FRAME = b'{"type": "ready"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the plan ----------------------------------------------------------------


@dataclass
class Plan:
    sessions: int = 50
    sockets: int = 2  # per session in the N-session scenario: two browsers' worth
    single_events: int = 200
    single_interval_ms: float = 20.0  # 50 events/s into one session
    multi_events: int = 40
    multi_interval_ms: float = 500.0  # per session: 100 events/s in all with 50 sessions
    warmup_events: int = 40
    rounds: int = 4  # each scenario alternates bare/app this many times
    drain_s: float = 10.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(single_events=60, multi_events=10, warmup_events=15, rounds=2)


def event_content(session_index: int, k: int) -> str:
    """A mid-sized agent message (~600 characters of markdown), as the engine writes."""
    return (
        f"## Step {k} for session {session_index}\n\n"
        "I computed the angular power spectrum from the simulated map and compared it with "
        "the fiducial model. The residuals stay below one sigma up to `ell = 2000`; above that "
        "the beam uncertainty dominates.\n\n"
        "- binned the spectrum with `delta_ell = 30`\n"
        "- masked the galactic plane (`fsky = 0.7`)\n"
        "- saved the plot to `plots/cl_residuals.png`\n\n"
        "Next I will fit the amplitude `A_s` and the tilt `n_s` with an MCMC and report the "
        "posterior means with their 68% intervals.\n"
    )


# --- the producer process ------------------------------------------------------
# It plays the run worker: an asyncio loop that calls
# database_sync_to_async(services.event_append), so the after-commit group_send
# goes back through this loop to Redis, exactly as in orchestrator/worker.py.


def _append_stamped(session_id: str, run_id: int, event, checkpoint: dict, tail: list) -> tuple[int, int]:
    """event_append, plus the monotonic time of its commit.

    The outer atomic block makes event_append's own block a savepoint, so the
    commit happens when the outer block exits; the stamp callback, registered
    first, runs first after that commit, before the app's announce callbacks.
    """
    from django.db import transaction

    from sessions import services

    stamp: list[int] = []
    with transaction.atomic():
        transaction.on_commit(lambda: stamp.append(time.monotonic_ns()))
        row = services.event_append(
            session_id=session_id, run_id=run_id, event=event, checkpoint=checkpoint, conversation_tail=tail
        )
    return row.seq, stamp[0]


async def _produce_app(targets: list[tuple[str, int]], n: int, interval: float, _seq_base: int) -> dict:
    from channels.db import database_sync_to_async

    from orchestrator.engine.events import EngineEvent, EventKind

    loop = asyncio.get_running_loop()
    append = database_sync_to_async(_append_stamped)
    stamps: list[tuple[int, int, int]] = []
    writes: list[int] = []  # ns from calling event_append to its commit: the write, with the fragment rendered in it
    start = loop.time() + 0.05

    async def one(i: int, session_id: str, run_id: int) -> None:
        due = start + interval * i / len(targets)  # sessions evenly out of phase
        tail: collections.deque[dict] = collections.deque(maxlen=50)
        for k in range(n):
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            content = event_content(i, k)
            event = EngineEvent(
                EventKind.MESSAGE, agent="engineer", content=content, data={"role": "assistant"},
                prompt_tokens=120, completion_tokens=80,
            )
            tail.append({"agent": "engineer", "kind": "message", "content": content})
            checkpoint = {"phase": "control", "step": k, "context_variables": {"bench": True}}
            called = time.monotonic_ns()
            seq, t = await append(session_id, run_id, event, checkpoint, list(tail))
            stamps.append((i, seq, t))
            writes.append(t - called)
            due += interval

    t0 = time.monotonic_ns()
    await asyncio.gather(*(one(i, sid, rid) for i, (sid, rid) in enumerate(targets)))
    return {"stamps": stamps, "writes": writes, "t0": t0, "t1": time.monotonic_ns()}


async def _produce_bare(groups: list[str], n: int, interval: float, seq_base: int) -> dict:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    loop = asyncio.get_running_loop()
    stamps: list[tuple[int, int, int]] = []
    start = loop.time() + 0.05

    async def one(i: int, group: str) -> None:
        due = start + interval * i / len(groups)
        for k in range(n):
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            seq = seq_base + k + 1
            t = time.monotonic_ns()  # the app's counterpart: its commit
            await layer.group_send(group, {"type": "bench.push", "seq": seq})
            stamps.append((i, seq, t))
            due += interval

    t0 = time.monotonic_ns()
    await asyncio.gather(*(one(i, g) for i, g in enumerate(groups)))
    return {"stamps": stamps, "t0": t0, "t1": time.monotonic_ns()}


async def _producer_loop(conn) -> None:
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "stop":
            conn.send(("ok", None))
            return
        try:
            if cmd[0] == "setup":
                from channels.db import database_sync_to_async

                result = await database_sync_to_async(make_fixtures)(*cmd[1:])
            elif cmd[0] == "app":
                result = await _produce_app(*cmd[1:])
            elif cmd[0] == "bare":
                result = await _produce_bare(*cmd[1:])
            else:
                raise ValueError(f"unknown command {cmd[0]!r}")
            conn.send(("ok", result))
        except Exception:  # noqa: BLE001 - reported to the parent, which stops the run
            conn.send(("error", traceback.format_exc()))


def _producer_main(conn) -> None:
    import django

    django.setup()
    import logging

    logging.getLogger("sessions").setLevel(logging.WARNING)  # no line per session started
    asyncio.run(_producer_loop(conn))


class Producer(PipeHelper):
    def __init__(self) -> None:
        super().__init__(_producer_main, "bench-producer")


# --- servers -------------------------------------------------------------------


class Server(LoggedProcess):
    def __init__(self, name: str, argv: list[str], port: int, env: dict, log: Path) -> None:
        super().__init__(name, argv, env, log)
        self.port = port

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} server did not listen on {self.port} in {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def log_tail(self, lines: int = 30) -> str:
        return self.tail(lines)


# --- WebSocket clients (autobahn, already installed as Daphne's dependency) --------
# This process never sets Django up (see bench.support.autobahn_client); the producer does the Django work.




class Client:
    """One live page: connects, says hello, records when each seq arrives."""

    def __init__(self, path: str, port: int, *, cookie: str | None, ready_seq: int | None) -> None:
        self.url = f"ws://{HOST}:{port}{path}"
        self.port = port
        self.cookie = cookie
        self.ready_seq = ready_seq  # app: ready when this seq arrives; bare: on the ready frame
        self.arrivals: dict[int, int] = {}
        self.frame_bytes: list[int] = []
        self.unexpected: list[bytes] = []
        self.proto = None
        self.close_code: int | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    async def connect(self, timeout: float = 15.0) -> None:
        headers = {"Cookie": f"sessionid={self.cookie}"} if self.cookie else {}
        factory_class, protocol_class = autobahn_client(quiet=False)
        factory = factory_class(self.url, origin=f"http://{HOST}:{self.port}", headers=headers)
        factory.protocol = protocol_class
        factory.owner = self
        factory.setProtocolOptions(openHandshakeTimeout=timeout, tcpNoDelay=True)
        await asyncio.get_running_loop().create_connection(factory, HOST, self.port)
        try:
            await asyncio.wait_for(asyncio.shield(self.opened), timeout)
            self.proto.sendMessage(json.dumps({"type": "hello", "after": 0}).encode())
            await asyncio.wait_for(asyncio.shield(self.ready), timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.url}: not ready in {timeout:.0f} s (close code {self.close_code})") from None

    def on_open(self, proto) -> None:
        self.proto = proto
        self.opened.set_result(None)

    def on_message(self, t: int, payload: bytes) -> None:
        seqs = SEQ_RE.findall(payload)
        if seqs:
            if self.ready.done():
                self.frame_bytes.append(len(payload))
            for raw in seqs:
                self.arrivals.setdefault(int(raw), t)
            if self.ready_seq is not None and self.ready_seq in self.arrivals and not self.ready.done():
                self.ready.set_result(None)
        elif payload == READY_FRAME and not self.ready.done():
            self.ready.set_result(None)
        else:
            self.unexpected.append(payload[:300])

    def on_close(self, code: int | None, reason: str | None) -> None:
        self.close_code = code
        for fut in (self.opened, self.ready):
            if not fut.done():
                fut.set_exception(RuntimeError(f"{self.url}: closed with code {code} ({reason})"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        if self.proto is not None and not self.closed.done():
            self.proto.sendClose(code=1000)
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), 3)
            except TimeoutError:
                self.proto.transport.close()


# --- measuring -----------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Result:
    scenario: str
    kind: str  # "app" or "bare"
    sessions: int
    expected: int
    received: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    offered_per_s: float
    achieved_per_s: float
    server_cpu_ms_per_event: float
    fragment_bytes: float
    unexpected_frames: int
    write_p50_ms: float = math.nan  # app only: event_append called -> committed (insert, checkpoint, fragment render)
    latencies_ms: list[float] = field(default_factory=list, repr=False)


@dataclass
class Side:
    """One path of a scenario (app or bare): its server, live clients and what was sent."""

    kind: str
    server: Server
    clients: list[Client]  # target i's sockets are clients[i * per_target : (i + 1) * per_target]
    targets: list
    per_target: int = 1
    stamps: list[tuple[int, int, int]] = field(default_factory=list)
    writes_ns: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    span_s: float = 0.0

    def watching(self, i: int) -> list[Client]:
        return self.clients[i * self.per_target : (i + 1) * self.per_target]

    def missing(self, stamps) -> bool:
        return any(seq not in c.arrivals for i, seq, _ in stamps for c in self.watching(i))

    def result(self, scenario: str, interval_ms: float) -> Result:
        lat = sorted(
            (c.arrivals[seq] - t) / 1e6 for i, seq, t in self.stamps for c in self.watching(i) if seq in c.arrivals
        )
        frames = [b for c in self.clients for b in c.frame_bytes]
        return Result(
            scenario=scenario, kind=self.kind, sessions=len(self.targets), expected=len(self.stamps) * self.per_target,
            received=len(lat), p50_ms=percentile(lat, 50), p95_ms=percentile(lat, 95), p99_ms=percentile(lat, 99),
            max_ms=lat[-1] if lat else math.nan, offered_per_s=len(self.targets) * 1000 / interval_ms,
            achieved_per_s=len(self.stamps) / max(self.span_s, 1e-9),
            server_cpu_ms_per_event=self.cpu_s * 1000 / max(len(self.stamps), 1),
            fragment_bytes=sum(frames) / len(frames) if frames else math.nan,
            unexpected_frames=sum(len(c.unexpected) for c in self.clients),
            write_p50_ms=percentile(sorted(w / 1e6 for w in self.writes_ns), 50), latencies_ms=lat,
        )


async def run_scenario(
    name: str, *, app: Server, bare: Server, producer: Producer, cookie: str, app_targets: list,
    bare_names: list[str], n: int, interval_ms: float, rounds: int, drain_s: float, sockets: int = 1,
) -> tuple[Result, Result]:
    """Both paths with all their clients connected; rounds alternate bare/app so drift hits both alike."""
    loop = asyncio.get_running_loop()
    sides = {
        "app": Side("app", app, [Client(f"/ws/sessions/{sid}/", app.port, cookie=cookie, ready_seq=1)
                                 for sid, _ in app_targets for _ in range(sockets)], app_targets, sockets),
        "bare": Side("bare", bare, [Client(f"/ws/bare/{g}/", bare.port, cookie=None, ready_seq=None)
                                    for g in bare_names for _ in range(sockets)], [f"bench-bare.{g}" for g in bare_names], sockets),
    }
    await asyncio.gather(*(c.connect() for side in sides.values() for c in side.clients))
    await asyncio.sleep(0.2)  # let the handshakes' after-work settle
    sizes = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
    seq_base = 0
    for r, size in enumerate(sizes):
        for kind in ("bare", "app") if r % 2 == 0 else ("app", "bare"):
            side = sides[kind]
            cpu0 = side.server.cpu_seconds()
            produced = await loop.run_in_executor(
                None, producer.request, kind, side.targets, size, interval_ms / 1000, seq_base
            )
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline and side.missing(produced["stamps"]):
                await asyncio.sleep(0.005)
            side.cpu_s += side.server.cpu_seconds() - cpu0
            side.span_s += (produced["t1"] - produced["t0"]) / 1e9
            side.stamps += produced["stamps"]
            side.writes_ns += produced.get("writes", [])
            await asyncio.sleep(0.1)
        seq_base += size
    await asyncio.gather(*(c.close() for side in sides.values() for c in side.clients))
    out = []
    for kind in ("app", "bare"):
        res = sides[kind].result(name, interval_ms)
        if res.received < res.expected:
            side = sides[kind]
            lost = [(i, seq) for i, seq, _ in side.stamps for c in side.watching(i) if seq not in c.arrivals]
            codes = sorted({c.close_code for i, _ in lost for c in side.watching(i)}, key=str)
            print(f"  warning: {name}/{kind}: {len(lost)} of {res.expected} events never arrived "
                  f"(session, seq): {lost[:12]}; close codes of those sockets: {codes}", file=sys.stderr)
        print(f"  {name:>12} {kind:4}  p50 {res.p50_ms:7.2f} ms  p99 {res.p99_ms:7.2f} ms  ({res.received} events)",
              file=sys.stderr)
        out.append(res)
    return out[0], out[1]


# --- setup ---------------------------------------------------------------------


def make_fixtures(n_sessions: int, token: str, fragment_file: Path) -> dict:
    """A user with a login cookie, the sessions, and one real fragment for the bare app.

    Runs in the producer process; returns plain data.
    """
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.template.loader import render_to_string
    from django.test import Client as DjangoClient

    from orchestrator.engine.events import EngineEvent, EventKind
    from sessions import services
    from sessions.models import Run, Session
    from sessions.fragments import render_push
    from sessions.selectors import events_after

    user = get_user_model().objects.create_user(username=f"push-bench-{token}")
    web = DjangoClient()
    web.force_login(user)
    cookie = web.cookies[settings.SESSION_COOKIE_NAME].value

    def start(label: str) -> tuple[str, int]:
        session = services.session_start(owner=user, task=f"Push latency benchmark: {label}", mode=Session.Mode.ONE_SHOT)
        return str(session.pk), Run.objects.get(session=session, number=1).pk

    warmup, single = start("warm-up"), start("1 session")
    multi = [start(f"{n_sessions} sessions, #{i}") for i in range(n_sessions)]

    # One real fragment, rendered as SessionConsumer._render_after renders it.
    row = services.event_append(
        session_id=warmup[0], run_id=warmup[1],
        event=EngineEvent(EventKind.MESSAGE, agent="engineer", content=event_content(0, 0),
                          data={"role": "assistant"}, prompt_tokens=120, completion_tokens=80),
    )
    session = Session.objects.select_related("state").get(pk=warmup[0])
    html = render_push(session, events_after(warmup[0], row.seq - 1))
    for needle in (f'id="event-{row.seq}"', f'data-seq="{row.seq}"', f'data-testid="event-count">{row.seq}<'):
        if needle not in html:
            raise RuntimeError(f"the rendered fragment lacks {needle!r}; bench/push_latency.py needs updating")
        html = html.replace(needle, needle.replace(str(row.seq), SEQ_MARK))
    fragment_file.write_text(html, encoding="utf-8")
    return {"db_vendor": connection.vendor, "cookie": cookie, "warmup": warmup, "single": single, "multi": multi, "fragment_bytes": len(html.encode())}


def versions() -> str:
    from importlib.metadata import version

    names = ["Django", "channels", "daphne", "channels-redis", "autobahn"]
    return ", ".join(f"{n} {version(n)}" for n in names)


def print_report(results: dict[tuple[str, str], Result], scenarios: list[str], header: list[str]) -> None:
    for line in header:
        print(line)
    print()
    cols = ["scenario", "n", "p50 ms", "p99 ms", "bare p50", "bare p99", "ratio p99", "target <=2x"]
    rows = []
    for name in scenarios:
        app, bare = results[(name, "app")], results[(name, "bare")]
        ratio = app.p99_ms / bare.p99_ms if bare.p99_ms > 0 else math.inf
        rows.append([
            name, f"{app.received}", f"{app.p50_ms:.2f}", f"{app.p99_ms:.2f}",
            f"{bare.p50_ms:.2f}", f"{bare.p99_ms:.2f}", f"{ratio:.2f}x", "met" if ratio <= 2 else "MISSED",
        ])
    _table(cols, rows)
    print()
    cols = ["scenario", "path", "sent", "recv", "p95 ms", "max ms", "offered/s", "achieved/s", "server CPU ms/ev", "bytes/frame", "write p50 ms"]
    rows = []
    for name in scenarios:
        for kind in ("app", "bare"):
            r = results[(name, kind)]
            rows.append([
                name, kind, f"{r.expected}", f"{r.received}", f"{r.p95_ms:.2f}", f"{r.max_ms:.2f}", f"{r.offered_per_s:.0f}",
                f"{r.achieved_per_s:.0f}", f"{r.server_cpu_ms_per_event:.2f}", f"{r.fragment_bytes:.0f}",
                "-" if math.isnan(r.write_p50_ms) else f"{r.write_p50_ms:.2f}",
            ])
    _table(cols, rows)


def _table(cols: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
    for r in rows:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))


async def run_all(plan: Plan, fx: dict, app: Server, bare: Server, producer: Producer, token: str) -> dict:
    results: dict[tuple[str, str], Result] = {}
    scenarios = [
        ("warm-up", [fx["warmup"]], plan.warmup_events, plan.single_interval_ms, 1, False, 1),
        ("1 session", [fx["single"]], plan.single_events, plan.single_interval_ms, plan.rounds, True, 1),
        (f"{plan.sessions} sessions", fx["multi"], plan.multi_events, plan.multi_interval_ms, plan.rounds, True, plan.sockets),
    ]
    for s, (name, targets, n, interval_ms, rounds, keep, sockets) in enumerate(scenarios):
        app_result, bare_result = await run_scenario(
            name, app=app, bare=bare, producer=producer, cookie=fx["cookie"], app_targets=targets,
            bare_names=[f"{token}-s{s}-{i}" for i in range(len(targets))], n=n, interval_ms=interval_ms,
            rounds=rounds, drain_s=plan.drain_s, sockets=sockets,
        )
        if keep:
            results[(name, "app")], results[(name, "bare")] = app_result, bare_result
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (fewer events)")
    parser.add_argument("--sessions", type=int, help="concurrent sessions in the second scenario (default 50)")
    parser.add_argument("--single-events", type=int, help="events for the 1-session scenario")
    parser.add_argument("--single-interval-ms", type=float, help="ms between events of the 1-session scenario")
    parser.add_argument("--multi-events", type=int, help="events per session in the N-session scenario")
    parser.add_argument("--multi-interval-ms", type=float, help="ms between events of each session, N-session scenario")
    parser.add_argument("--sockets", type=int, help="sockets watching each session in the N-session scenario (default 2)")
    parser.add_argument("--rounds", type=int, help="alternate bare/app this many times per scenario (default 4)")
    parser.add_argument("--json", type=Path, help="also write the results (with every latency) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (database, server logs)")
    args = parser.parse_args()

    plan = Plan.quick() if args.quick else Plan()
    for name in ("sessions", "sockets", "single_events", "single_interval_ms", "multi_events", "multi_interval_ms", "rounds"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    token = secrets.token_hex(4)
    tmp = Path(tempfile.mkdtemp(prefix="push-bench-"))
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    prefix = f"pushbench{token}"
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE") or "cmbagent_site.settings",
            "CMBAGENT_VAR_DIR": str(tmp),
            "REDIS_URL": redis_url,
            "CHANNELS_PREFIX": prefix,  # this run's keys only
            "EMBEDDED_WORKER": "0",
            "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
            "BENCH_FRAGMENT_FILE": str(tmp / "fragment.html"),
            "PYTHONUNBUFFERED": "1",
            "MAX_LIVE_RUNS_PER_USER": "0",  # one bench user holds every session
        }
    )
    env = dict(os.environ)

    import redis

    rconn = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    try:
        rconn.ping()
    except redis.RedisError as exc:
        print(f"Redis at {redis_url} is not reachable ({exc}); set REDIS_URL.", file=sys.stderr)
        return 2

    servers: list[Server] = []
    producer: Producer | None = None
    try:
        print(f"setting up in {tmp} ...", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--no-input", "-v0"], cwd=ROOT, env=env,
            capture_output=True, text=True,
        )
        if done.returncode:
            print(done.stdout, done.stderr, file=sys.stderr)
            return 1
        producer = Producer()
        fx = producer.request("setup", plan.sessions, token, tmp / "fragment.html")

        app_port, bare_port = free_port(), free_port()
        app = Server("app", [sys.executable, "manage.py", "serve", "--no-worker", "--host", HOST, "--port",
                             str(app_port)], app_port, env, tmp / "app.log")
        servers.append(app)
        bare = Server("bare", [sys.executable, "-m", "daphne", "-b", HOST, "-p", str(bare_port),
                               "bench.bare_app:application"], bare_port, env, tmp / "bare.log")
        servers.append(bare)
        app.wait_ready()
        bare.wait_ready()

        results = asyncio.run(run_all(plan, fx, app, bare, producer, token))
        for server in servers:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} server died during the run:\n{server.log_tail()}")

        scenarios = ["1 session", f"{plan.sessions} sessions"]
        header = [
            "Push latency: event commit -> fragment received by a WebSocket client (loopback)",
            f"app:  event_append -> on_commit group_send -> Redis -> Daphne `manage.py serve` -> "
            f"SessionConsumer -> client (fragment rendered once in the writing transaction, sent after commit; rows read on a gap)",
            "bare: group_send -> Redis -> Daphne bench/bare_app.py (fixed fragment, same bytes) -> client",
            f"settings {os.environ['DJANGO_SETTINGS_MODULE']}; database {fx['db_vendor']}{' (DATABASE_URL)' if os.environ.get('DATABASE_URL') else ' (temp file, WAL)'}; "
            f"channel layer channels_redis at {redis_url}; fragment {fx['fragment_bytes']} bytes",
            f"1 session: {plan.single_events} events, one every {plan.single_interval_ms:g} ms; "
            f"{plan.sessions} sessions: {plan.multi_events} events each, one every {plan.multi_interval_ms:g} ms "
            f"per session (sessions out of phase), {plan.sockets} sockets watching each",
            f"each scenario in {plan.rounds} rounds alternating bare/app; "
            f"Python {platform.python_version()}, {versions()}",
            f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
            f"total {time.monotonic() - started:.0f} s",
        ]
        for server in servers:
            crashes = server.log.read_text(errors="replace").count("Exception inside application")
            if crashes:
                header.append(f"NOTE: {crashes} consumer crash(es) in the {server.name} server log "
                              f"(run with --keep to read {server.log.name}).")
        cpus = os.cpu_count() or 1
        # The benchmark itself keeps about one CPU busy; more than that is someone else.
        if load_before > 0.5 * cpus or os.getloadavg()[0] > 0.5 * cpus + 1:
            header.append("NOTE: the machine was busy with other work; these figures include that contention.")
        print_report(results, scenarios, header)
        lost = sum(r.expected - r.received for r in results.values())
        parts, met = [], True
        for name in scenarios:
            app, bare = results[(name, "app")], results[(name, "bare")]
            ratio = app.p99_ms / bare.p99_ms if bare.p99_ms > 0 else math.inf
            met = met and ratio <= 2
            parts.append(f"{name}: p50 {app.p50_ms:.1f} ms, p99 {app.p99_ms:.1f} ms = {ratio:.2f}x bare p99")
        headline(
            "push_latency.py", f"event commit -> fragment at a WebSocket client vs a bare Channels consumer ({plan.sockets} sockets per session)",
            "; ".join(parts) + f"; lost {lost}", "p99 <= 2x bare", "met" if met and not lost else "MISSED",
        )
        if args.json:
            args.json.write_text(json.dumps({
                "plan": asdict(plan), "header": header,
                "results": [asdict(r) for r in results.values()],
            }, indent=1))
        return 1 if lost else 0
    finally:
        if producer is not None:
            producer.stop()
        for server in servers:
            server.stop()
        try:
            keys = list(rconn.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                rconn.delete(*keys)
        except redis.RedisError:
            pass
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
