"""Socket hygiene: 10,000 sockets opened and closed against a real server leave nothing behind.

A Daphne server (``manage.py serve --no-worker``, DEBUG off as in production,
channels-redis on the cluster's Redis) takes 10,000 WebSocket connections over
loopback, at most CONCURRENCY at a time: session pages (most of them), session
lists and the staff approval queue, logged in with a real session cookie and
the right Origin. Half of them close cleanly (a close frame, then the
server's answer), half abruptly (a TCP reset, or a FIN without a close
frame). Meanwhile a producer process appends events to the watched sessions
through ``sessions.services.event_append`` (with status changes and approval
requests among them), so pushes are in flight to every kind of socket while
it closes: right after the handshake, just after its hello, while its
catch-up is read from the database, while it listens. The first OVERLOADS
sockets send the server tens of thousands of frames at once and go: the
server closes them at its rate limit (4429) and must drop the rest unread,
not work through them for nobody until Daphne kills their consumers; the
last FLOODS flood the server until it closes them (with frames of theirs
still on their way), and the last DRAINS stay open a moment, so that the
server reads whatever the last pushes left for channels that are gone.

Once every socket is closed, the server must be back where it was after a
warm-up of WARM_UP sockets:

- the asyncio task count of its event loop (read through the loopback-only
  diagnostics view, on because this test starts the server with
  ``CMBAGENT_DIAGNOSTICS=1``), within SETTLE_SECONDS;
- no member left in any of the channel layer's group sets in Redis: every
  socket is closed, so any member is a dead channel that every push to its
  group still pays for (until channels-redis's one-day group expiry);
- no per-channel receive buffer left in the server's channel layer;
- resident memory within RSS_GROWTH_MIB of the warm-up's;
- nothing in the server log from a send to a closed socket (no "Exception
  inside application", no traceback), and no consumer that Daphne had to
  kill: not the OVERLOADS consumers (which, before their late frames were
  dropped, took the server minutes of work and were killed), nor one that
  waited on a channel-layer receive that ignored its cancellation. (That a
  consumer cancelled mid-handler leaves its groups is tests/test_sockets.py's.)
  The producer, which stands for a run, saw no failed write or announcement.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import pytest

from tests.system.conftest import PROJECT_DIR

N_SOCKETS = 10_000
WARM_UP = 500  # sockets before the baseline: imports, caches, pools and allocator arenas have grown by then
CONCURRENCY = 56
OVERLOADS = 2  # of the N_SOCKETS, first: send the server far more frames than it would handle in Daphne's 10 s
OVERLOAD_FRAMES = 40_000  # pings: handled one by one, over 10 s of work for any server (a trip to its database thread each)
FLOODS = 24  # of the N_SOCKETS, at the end: flood the server until it closes them
DRAINS = 8  # of the N_SOCKETS: the last, kept open a moment
# Daphne kills a consumer still running 10 s after its socket closed, and it ends at once:
# any task left after this is a leak.
SETTLE_SECONDS = 20.0
TASK_SLACK = 3  # tasks of the diagnostics request itself and of background timers that come and go
# Clean runs grew 4-9 MiB past the warm-up (allocator fragmentation, caches, and the layer's list
# of channels ended in the last minute, bounded). A leak of one buffered push (a few KB of HTML)
# or of one consumer (tens of KB) per socket would be tens to hundreds of MB over 9,500 sockets:
# before the fixes, a heavier mix of this test grew the server by 103 MiB.
RSS_GROWTH_MIB = 24
EVENTS_PER_SECOND = 6  # the producer's pace: each event is pushed to every socket on its session

PAGE = os.sysconf("SC_PAGE_SIZE")

PRODUCER = r"""
import json, logging, os, sys, time, traceback
import django

django.setup()
from orchestrator.engine.events import EngineEvent, EventKind
from sessions import services

sessions, stop, rate = sys.argv[1].split(","), sys.argv[2], float(sys.argv[3])
failures = []


class Failures(logging.Handler):
    def emit(self, record):
        failures.append(record.getMessage())


logging.getLogger("sessions").addHandler(Failures(level=logging.WARNING))
logging.getLogger("approvals").addHandler(Failures(level=logging.WARNING))
text = "Step %d: the **spectrum** fit converged; residuals below `1e-3`.\n\n" + "The power at each multipole was checked against the reference. " * 6
n, started = 0, time.monotonic()
while not os.path.exists(stop):
    session_id = sessions[n % len(sessions)]
    if n % 50 == 49:
        event = EngineEvent(EventKind.APPROVAL, agent="control", content=f"Go on after step {n}?",
                            data={"request": "step", "options": ["continue", "skip", "redo", "abort"]})
    elif n % 10 == 9:
        event = EngineEvent(EventKind.STATUS, content="still going", data={"status": "running"})
    else:
        event = EngineEvent(EventKind.MESSAGE, agent="engineer", content=text % n)
    try:
        services.event_append(session_id=session_id, run_id=None, event=event)
    except Exception:
        failures.append(traceback.format_exc())
    n += 1
    delay = started + n / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print("@@" + json.dumps({"events": n, "failures": failures[:5], "failure_count": len(failures)}), flush=True)
"""

SETUP = """
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client
from orchestrator.engine.events import EngineEvent, EventKind
from sessions import services

alice = User.objects.get(username='alice')
carol = User.objects.create_user('carol', password='x-Pa55word!', is_staff=True)
carol.user_permissions.add(Permission.objects.get(codename='approvals'))
live = [str(services.session_start(owner=alice, task=f'Hygiene task {i}', mode='one_shot').pk) for i in range(4)]
long = services.session_start(owner=alice, task='A long transcript', mode='one_shot')
services.events_append(session_id=long.pk, run_id=None, events=[
    EngineEvent(EventKind.MESSAGE, agent='researcher', content=f'Line {i}: some *markdown* and `code`') for i in range(450)])
cookies = {}
for user in (alice, carol):
    web = Client()
    web.force_login(user)
    cookies[user.username] = web.cookies[settings.SESSION_COOKIE_NAME].value
emit({'live': live, 'long': str(long.pk), 'cookies': cookies})
"""


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm", "rb") as fh:
        return int(fh.read().split()[1]) * PAGE / (1024 * 1024)


# --- a WebSocket client, small enough to open thousands quickly ------------------------------


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    key = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big") if length else b""
    return header + mask + masked


def _text(obj: dict) -> bytes:
    return _frame(0x1, json.dumps(obj).encode())


CLOSE_FRAME = _frame(0x8, struct.pack("!H", 1000))
PING = _text({"type": "ping"})


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


class Churn:
    """Opens and closes sockets, CONCURRENCY at a time; counts what happened."""

    def __init__(self, port: int, world: dict, seqs: dict[str, int]) -> None:
        self.port, self.world, self.seqs = port, world, seqs  # seqs: each live session's last seq, kept fresh by a thread
        self.stats: Counter = Counter()
        self.errors: list[str] = []

    def plan(self, i: int, forced: str | None = None) -> tuple[str, str | None, str, str]:
        """(path, cookie, behaviour, close) of socket ``i``: the same for every run of the test."""
        rng = random.Random(i)
        close = "clean" if i % 2 == 0 else ("reset" if i % 4 == 1 else "fin")
        alice, carol = self.world["cookies"]["alice"], self.world["cookies"]["carol"]
        if forced:
            return f"/ws/sessions/{rng.choice(self.world['live'])}/", alice, forced, close
        where = rng.random()
        if where < 0.10:
            return "/ws/sessions/", alice, rng.choice(["bare", "listen"]), close
        if where < 0.15:
            return "/ws/approvals/", carol, rng.choice(["bare", "listen"]), close
        roll = rng.random()
        if roll < 0.004:
            return f"/ws/sessions/{self.world['long']}/", alice, "catch-up", close
        session = rng.choice(self.world["live"])
        path = f"/ws/sessions/{session}/"
        # Shares of the session page sockets; each frame or push a socket gets costs the server a trip
        # to its database thread (channels closes old connections before every handler), so the
        # costly kinds are rare.
        for share, behaviour in ((0.20, "bare"), (0.52, "hello"), (0.82, "listen"), (0.975, "pings")):
            if roll < share:
                return path, alice, behaviour, close
        return path, None, "anonymous", close  # refused after accept (4401)

    async def one(self, i: int, forced: str | None = None) -> None:
        path, cookie, behaviour, close = self.plan(i, forced)
        self.stats[behaviour] += 1
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 15)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{self.port}\r\n"
                    + (f"Cookie: sessionid={cookie}\r\n" if cookie else "")
                    + "\r\n"
                ).encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.stats["refused"] += 1
                return
            self.stats["opened"] += 1
            await self.behave(path, behaviour, close, reader, writer)
        finally:
            await self.close(close, reader, writer)

    async def behave(self, path: str, behaviour: str, close: str, reader, writer) -> None:
        session = path.strip("/").split("/")[-1]
        if behaviour in ("bare", "anonymous"):
            return  # closes right after the handshake, with the server's first pushes on their way
        if behaviour == "catch-up":
            writer.write(_text({"type": "hello", "after": 0}))  # three batches of rows: gone during the first
            await self.receive(reader, 1, 2.0)
            return
        after = max(0, self.seqs.get(session, 0) - random.randint(0, 8))
        if behaviour == "hello":
            writer.write(_text({"type": "hello", "after": after}))  # and gone before its catch-up arrives
        elif behaviour == "listen":
            if path.count("/") > 3:
                writer.write(_text({"type": "hello", "after": after}))
            await self.receive(reader, 1, 5.0)  # its catch-up (or the queue, or a badge) ...
            await self.receive(reader, 1_000, random.uniform(0.0, 0.3))  # ... live pushes, then close mid-stream
        elif behaviour == "pings":
            writer.write(_text({"type": "hello", "after": after}) + _text({"type": "ping"}) * 2)
        elif behaviour == "overload":
            # Thousands of frames, then gone: handled one by one (a trip to the database thread each),
            # they would keep the consumer busy long past Daphne's 10 s. The server closes the socket at
            # its rate limit and drops the rest.
            writer.write(PING * OVERLOAD_FRAMES)
            await writer.drain()
            if await self.receive(reader, 1_000, 5.0):  # its pongs, the error fragment, the close
                self.stats["overload-closed-by-server"] += 1
        elif behaviour == "flood":
            # Over the burst of 60 at once: the server answers, closes it (4429), and drops the
            # frames of it that were still on their way.
            writer.write(_text({"type": "ping"}) * 100)
            if await self.receive(reader, 1_000, 5.0):
                self.stats["flood-closed-by-server"] += 1
                await asyncio.sleep(0.3)  # a slow goodbye: its socket stays closing while the late frames arrive

    async def receive(self, reader, count: int, seconds: float) -> bool:
        """Read up to ``count`` messages for up to ``seconds``; whether the server closed the socket."""
        deadline = time.monotonic() + seconds
        try:
            for _ in range(count):
                opcode, _payload = await asyncio.wait_for(_read_frame(reader), max(0.001, deadline - time.monotonic()))
                self.stats["messages" if opcode == 0x1 else f"opcode-{opcode}"] += 1
                if opcode == 0x8:
                    return True
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        return False

    async def close(self, how: str, reader, writer) -> None:
        if how == "clean" and not writer.is_closing():
            try:
                writer.write(CLOSE_FRAME)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # read up to the server's close frame
                    opcode, _ = await asyncio.wait_for(_read_frame(reader), deadline - time.monotonic())
                    if opcode == 0x8:
                        self.stats["closed-clean"] += 1
                        break
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                self.stats["clean-close-cut"] += 1
            writer.close()
        elif how == "reset":
            sock = writer.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # the server closed it first
            writer.transport.abort()  # RST: the server learns of it from the kernel, mid-whatever
            self.stats["closed-reset"] += 1
        else:
            writer.transport.abort()  # FIN without a close frame
            self.stats["closed-fin"] += 1

    async def run(self, first: int, last: int, concurrency: int = CONCURRENCY, forced: str | None = None) -> None:
        numbers = iter(range(first, last))

        async def lane() -> None:
            for i in numbers:
                try:
                    await self.one(i, forced)
                except Exception as exc:  # noqa: BLE001 - counted, and the test fails on too many
                    self.stats["client-errors"] += 1
                    if len(self.errors) < 5:
                        self.errors.append(f"socket {i}: {exc!r}")

        await asyncio.gather(*(lane() for _ in range(concurrency)))


# --- the server and the channel layer, as the test sees them ---------------------------------


class Server:
    def __init__(self, cluster, url: str) -> None:
        import redis

        self.cluster, self.url = cluster, url
        self.pid = cluster.processes["server"].pid
        self.prefix = cluster.env["CHANNELS_PREFIX"]
        self.redis = redis.Redis.from_url(cluster.env["REDIS_URL"])

    def log(self) -> str:
        return (self.cluster.var_dir / "server.log").read_text(errors="replace")

    def diagnostics(self) -> dict:
        with urllib.request.urlopen(self.url + "/_diagnostics/", timeout=10) as resp:
            return json.loads(resp.read())

    def group_members(self) -> dict[str, int]:
        """Members of each of the layer's group sets in Redis (none once every socket is closed)."""
        found = {}
        for key in self.redis.scan_iter(match=f"{self.prefix}:group:*", count=1000):
            found[key.decode()] = self.redis.zcard(key)
        return {key: n for key, n in found.items() if n}

    def snapshot(self) -> dict:
        diag = self.diagnostics()
        members = self.group_members()
        return {**diag, "group_members": sum(members.values()), "groups": members, "rss_mib": round(_rss_mib(self.pid), 1)}

    def quiet(self, seconds: float = 3) -> dict:
        """The baseline: the server's state with no socket open, at its fewest tasks over ``seconds``."""
        deadline, best = time.monotonic() + seconds, None
        while time.monotonic() < deadline:
            state = self.snapshot()
            best = state if best is None or state["tasks"] < best["tasks"] else best
            time.sleep(0.25)
        return best

    def settle(self, baseline_tasks: int, seconds: float = SETTLE_SECONDS) -> dict:
        """The server's state once it is back to baseline, or as it is after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            state = self.snapshot()
            clean = state["tasks"] <= baseline_tasks + TASK_SLACK and not state["group_members"] and not state["receive_buffers"]
            if clean or time.monotonic() > deadline:
                return state
            time.sleep(0.25)


def _follow_seqs(cluster, sessions: list[str], seqs: dict[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        for session_id, last in cluster.sql("SELECT id::text, last_seq FROM agent_sessions_session WHERE id::text = ANY(%s)", sessions):
            seqs[session_id] = last
        stop.wait(0.2)


@pytest.fixture
def hygiene(cluster):
    cluster.env.update(
        DEBUG="0",  # as in production
        SECRET_KEY="socket-hygiene-" + base64.b64encode(os.urandom(24)).decode(),
        CMBAGENT_DIAGNOSTICS="1",
        CHANNELS_PREFIX=f"hygiene{os.getpid()}",
    )
    world = cluster.shell(SETUP)
    url = cluster.start_server("server")
    server = Server(cluster, url)
    try:
        yield cluster, server, world
    finally:
        cluster.stop_all()
        keys = list(server.redis.scan_iter(match=f"{server.prefix}*", count=1000))
        for at in range(0, len(keys), 500):
            server.redis.delete(*keys[at:at + 500])


def test_ten_thousand_sockets_leave_no_tasks_groups_buffers_or_memory_behind(hygiene, tmp_path):
    cluster, server, world = hygiene
    started = time.monotonic()
    seqs: dict[str, int] = {}
    stop_following = threading.Event()
    follower = threading.Thread(target=_follow_seqs, args=(cluster, world["live"], seqs, stop_following), daemon=True)
    follower.start()
    stop_file = tmp_path / "stop-producer"
    producer_log = open(tmp_path / "producer.log", "w+b")
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, ",".join(world["live"]), str(stop_file), str(EVENTS_PER_SECOND)],
        cwd=PROJECT_DIR, env=cluster.env, stdout=producer_log, stderr=subprocess.STDOUT,
    )
    churn = Churn(int(server.url.rsplit(":", 1)[1]), world, seqs)
    try:
        cluster.wait_until(lambda: sum(seqs.values()) > 5 * len(world["live"]) + 20, 30, "the producer's first events")

        # The warm-up, from OVERLOADS sockets that send far more frames than the server would handle
        # in Daphne's 10 s; they are in the baseline.
        asyncio.run(churn.run(0, OVERLOADS, OVERLOADS, forced="overload"))
        asyncio.run(churn.run(OVERLOADS, WARM_UP))
        warm = server.quiet()
        churn_started = time.monotonic()
        asyncio.run(churn.run(WARM_UP, N_SOCKETS - FLOODS - DRAINS))
        churn_seconds = time.monotonic() - churn_started
        # Flooding sockets, while the server is otherwise quiet: each of their frames costs the server
        # a trip to its database thread, and in the churn they queue up so slowly that the rate
        # limit (a burst of 60, then 20 a second) would never close them.
        asyncio.run(churn.run(N_SOCKETS - FLOODS - DRAINS, N_SOCKETS - DRAINS, concurrency=4, forced="flood"))
        # A few sockets that stay a moment, so that the server's receive loop reads whatever the
        # last pushes left for channels that are gone.
        asyncio.run(churn.run(N_SOCKETS - DRAINS, N_SOCKETS, concurrency=DRAINS, forced="listen"))
    finally:
        stop_file.touch()
        stop_following.set()
        try:
            producer.wait(timeout=30)
        finally:
            if producer.poll() is None:
                producer.kill()
        producer_log.seek(0)
        produced_text = producer_log.read().decode(errors="replace")
        producer_log.close()

    after = server.settle(baseline_tasks=warm["tasks"])
    log = server.log()
    killed = [line for line in log.splitlines() if "took too long to shut down and was killed" in line]
    report = {
        "warm": {k: warm[k] for k in ("tasks", "rss_mib", "group_members", "receive_buffers")},
        "after": {k: after[k] for k in ("tasks", "rss_mib", "group_members", "receive_buffers", "buffered_messages", "task_kinds")},
        "churn_seconds": round(churn_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "stats": dict(churn.stats),
        "killed_by_daphne": len(killed),
        "produced": produced_text.strip()[-300:],
        "client_errors": churn.errors,
    }
    print("socket hygiene:", json.dumps(report))

    produced = json.loads(next(line[2:] for line in produced_text.splitlines() if line.startswith("@@")))
    # The sockets were really opened, churned with pushes in flight, and closed both ways.
    assert churn.stats["opened"] >= 0.99 * N_SOCKETS, report
    assert churn.stats["client-errors"] <= 0.01 * N_SOCKETS, (churn.errors, report)
    assert churn.stats["flood-closed-by-server"] >= FLOODS // 2, report
    assert churn.stats["overload-closed-by-server"] == OVERLOADS, report  # the overload happened, and was stopped
    assert churn.stats["closed-clean"] >= 0.45 * N_SOCKETS and churn.stats["closed-reset"] + churn.stats["closed-fin"] >= 0.45 * N_SOCKETS, report
    assert churn.stats["messages"] > N_SOCKETS // 20 and produced["events"] > EVENTS_PER_SECOND / 2 * churn_seconds, (produced, report)

    problems = []
    # Sends to closed sockets never raised: not into the writer (a run), not inside the server.
    if produced["failure_count"]:
        problems.append(f"the producer's writes or announcements failed: {produced}")
    for sign in ("Exception inside application", "Traceback"):
        if sign in log:
            problems.append(f"{sign!r} in the server log:\n{log[log.find(sign) - 300:][:3000]}")
    if killed:
        problems.append(f"{len(killed)} consumers killed by Daphne, slow to end after their sockets closed: {killed[0][:400]}")
    # Nothing left behind.
    if after["group_members"]:
        problems.append(f"closed sockets still in groups: {after['groups']}")
    if after["receive_buffers"]:
        problems.append(f"{after['receive_buffers']} receive buffers ({after['buffered_messages']} messages) left for channels nobody reads")
    if after["tasks"] > warm["tasks"] + TASK_SLACK:
        problems.append(f"tasks: {warm['tasks']} after the warm-up, {after['tasks']} now: {after['task_kinds']}")
    if after["rss_mib"] - warm["rss_mib"] > RSS_GROWTH_MIB:
        problems.append(f"resident memory: {warm['rss_mib']} MiB after the warm-up, {after['rss_mib']} MiB now")
    assert not problems, "\n".join(problems) + f"\n{json.dumps(report)}"
