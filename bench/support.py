"""Pieces the benchmarks share: free loopback ports, logged child processes, a spawned helper
process spoken to over a pipe, process memory and CPU time from /proc, an HTTP client, the
fragment patterns, PostgreSQL databases of their own, and table printing. No Django here: the
benchmarks' own processes hold asyncio WebSocket clients, which must not share a process with
Daphne's Twisted; the functions that use Django (``login_users``, ``serve_django_requests``)
import it when they run, in the spawned helper process."""
from __future__ import annotations

import asyncio
import functools
import json
import math
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


RESULT_MARK = "RESULT "


def headline(bench: str, measures: str, figures: str, target: str = "", verdict: str = "") -> None:
    """Print a benchmark's headline as one machine-readable line; ``bench/report.py`` turns these into the
    README's results table."""
    print(RESULT_MARK + json.dumps({"bench": bench, "measures": measures, "figures": figures, "target": target, "verdict": verdict}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE / MIB
    except (OSError, IndexError, ValueError):
        return 0.0


class LoggedProcess:
    """A child process (a server, a worker) run from the project's folder with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path) -> None:
        self.name, self.log = name, log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_for(self, needle: str, timeout: float = 60.0) -> None:
        """Wait until ``needle`` is in the log; a process that exits first, or a timeout, raises with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.tail()}")
            if needle in self.text():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: no {needle!r} in its log after {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log_file.close()


class PipeHelper:
    """A spawned process running ``target(conn)``, asked over a pipe: ``request(*cmd)`` → its answer."""

    def __init__(self, target: Callable, name: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.name = name
        self.process = ctx.Process(target=target, args=(child,), name=name, daemon=True)
        self.process.start()

    def request(self, *cmd):
        self.conn.send(cmd)
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.name} failed:\n{result}")
        return result

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.request("stop")
            except (OSError, EOFError, RuntimeError):
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


@functools.lru_cache(maxsize=None)
def autobahn_client(*, quiet: bool = False) -> tuple[type, type]:
    """(factory class, protocol class) of an asyncio WebSocket client whose events go to ``factory.owner``.

    Imported on first use, in the client process only: ``django.setup()`` imports Daphne,
    which pins txaio (autobahn's backend) to Twisted. ``quiet``: no log line per socket
    whose closing handshake times out.
    """
    import txaio

    txaio.use_asyncio()
    if quiet:
        txaio.set_global_log_level("error")
    from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol

    class Protocol(WebSocketClientProtocol):
        def onOpen(self) -> None:  # noqa: N802 - autobahn's names
            self.factory.owner.on_open(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            self.factory.owner.on_message(time.monotonic_ns(), payload)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
            self.factory.owner.on_close(code, reason)

    return WebSocketClientFactory, Protocol


class SessionSocket:
    """A session page's socket, kept as the page's own script keeps it: it reconnects with backoff when it
    drops, with the last seq the page shows in its URL and in its hello, so a reconnect's cost is measured,
    not lost.

    Subclasses say when to stop trying (``stopped``), which seq the page shows (``last_seq``), what a failed
    connect and giving up mean to them (``connect_failed``, ``give_up``), and handle ``on_message`` and
    ``on_close`` (calling ``closed()`` first).
    """

    RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0)
    MAX_RECONNECTS = 12
    CLOSE_WAIT_S = 3.0

    def __init__(self, port: int, cookies: dict[str, str]) -> None:
        self.port, self.cookies = port, cookies
        self.session_id = ""
        self.reconnects = 0
        self.proto = None
        self.closing = False
        self._closed = asyncio.Event()

    def stopped(self) -> bool:
        return self.closing

    def last_seq(self) -> int:
        return 0

    def connect_failed(self, exc: OSError) -> None:
        self._retry(f"connect failed: {exc}")

    def give_up(self, why: str) -> None:
        """Called once, after MAX_RECONNECTS reconnects."""

    async def _connect(self) -> None:
        if self.stopped():
            return
        factory_class, protocol_class = autobahn_client(quiet=True)
        # As the page does: the last seq it shows in the URL (the first batch comes at once), and a hello.
        url = f"ws://{HOST}:{self.port}/ws/sessions/{self.session_id}/?after={self.last_seq()}"
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        factory = factory_class(url, origin=f"http://{HOST}:{self.port}", headers={"Cookie": cookie})
        factory.protocol = protocol_class
        factory.owner = self
        factory.setProtocolOptions(openHandshakeTimeout=30, tcpNoDelay=True)
        self._closed.clear()
        try:
            await asyncio.get_running_loop().create_connection(factory, HOST, self.port)
        except OSError as exc:
            self.connect_failed(exc)

    def _retry(self, why: str) -> None:
        if self.stopped():
            return
        self.reconnects += 1
        if self.reconnects > self.MAX_RECONNECTS:
            self.give_up(why)
            return
        delay = self.RECONNECT_DELAYS[min(self.reconnects, len(self.RECONNECT_DELAYS)) - 1]
        asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self._connect()))

    def on_open(self, proto) -> None:
        self.proto = proto
        proto.sendMessage(json.dumps({"type": "hello", "after": self.last_seq()}).encode())

    def closed(self) -> None:
        """The socket is gone (the first thing ``on_close`` does)."""
        self.proto = None
        self._closed.set()

    async def close(self) -> None:
        self.closing = True
        if self.proto is not None:
            self.proto.sendClose(code=1000)
            try:
                await asyncio.wait_for(self._closed.wait(), self.CLOSE_WAIT_S)
            except TimeoutError:
                if self.proto is not None:
                    self.proto.transport.close()


# --- /proc: CPU time and the processes of a worker ------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (index 0 is the state, 1 the parent pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_s(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of a process (``children``: of its reaped children)."""
    f = proc_stat(pid)
    if f is None:
        return 0.0
    i = 13 if children else 11
    return (int(f[i]) + int(f[i + 1])) / CLK_TCK


def on_cpu_ms(pid: int) -> float:
    """Milliseconds of CPU a process has used, all its threads, ended ones included: its process CPU
    clock (Linux's clock id for a pid), in ns, where :func:`cpu_s` counts clock ticks of 10 ms.
    0.0 for a process that is gone."""
    try:
        return time.clock_gettime_ns((~pid << 3) | 2) / 1e6  # CPUCLOCK_SCHED of the whole process
    except OSError:
        return 0.0


def children_of(*parents: int) -> dict[int, int]:
    """The live children of ``parents``: child pid -> parent pid."""
    wanted, found = set(parents), {}
    for pid in all_pids():
        f = proc_stat(pid)
        if f is not None and int(f[1]) in wanted:
            found[pid] = int(f[1])
    return found


def machine_busy_s() -> float:
    with open("/proc/stat", "rb") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK  # all but idle and iowait


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_matching(pred) -> list[int]:
    return [p for p in all_pids() if pred(cmdline(p))]


def launchers_of(workers: list[int]) -> dict[int, int]:
    """The run launcher (multiprocessing's forkserver) of each worker: launcher pid -> worker pid."""
    return {pid: parent for pid, parent in children_of(*workers).items() if "multiprocessing.forkserver" in cmdline(pid)}


def runs_cpu_s(workers: list[int]) -> float:
    """CPU seconds of the runs' processes: reaped by each worker's launcher, which lives as long as its worker."""
    return sum(cpu_s(w, children=True) for w in workers) + sum(
        cpu_s(launcher) + cpu_s(launcher, children=True) for launcher in launchers_of(workers)
    )


# --- the app over loopback: processes, HTTP, fragments ---------------------------------------------

# One transcript event in a pushed or rendered fragment: (seq, kind, agent, inner HTML).
ARTICLE_RE = re.compile(
    rb'<article id="event-(\d+)" class="[^"]*" data-seq="\d+" data-kind="([a-z_]+)" data-agent="([^"]*)">(.*?)</article>',
    re.S,
)
BADGE_RE = re.compile(rb'class="badge badge--([a-z_]+)"')  # a status event's new status, inside its article


def migrate(env: dict) -> None:
    done = subprocess.run([sys.executable, "manage.py", "migrate", "--no-input", "-v0"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"migrate failed:\n{done.stdout}\n{done.stderr}")


async def http(port: int, method: str, path: str, cookies: dict[str, str], form: dict | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, list, bytes]:
    """One HTTP/1.1 request on a fresh connection: (status, headers, body)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    body = urllib.parse.urlencode(form).encode() if form is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close",
             "Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items())]
    if form is not None:
        lines += ["Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(body)}",
                  f"Origin: http://{HOST}:{port}", f"Referer: http://{HOST}:{port}/sessions/new/"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = await reader.read()
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    head_lines = head.decode("latin-1").split("\r\n")
    if not head_lines[0].startswith("HTTP/"):
        raise ConnectionError(f"no HTTP answer to {method} {path} ({len(data)} bytes)")
    answer_headers = [tuple(x.strip() for x in line.split(":", 1)) for line in head_lines[1:] if ":" in line]
    return int(head_lines[0].split()[1]), answer_headers, rest


async def csrf_token(port: int, cookies: dict) -> tuple[str, str]:
    """(csrftoken cookie, form token) from the new-session page; not tied to a login, so one serves every user."""
    status, headers, body = await http(port, "GET", "/sessions/new/", cookies)
    if status != 200:
        raise RuntimeError(f"GET /sessions/new/ answered {status}")
    cookie = next(v.split(";")[0].split("=", 1)[1] for k, v in headers if k.lower() == "set-cookie" and v.startswith("csrftoken="))
    m = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body)
    return cookie, m.group(1).decode()


def pg_database(admin_url: str, db_name: str, create: bool) -> None:
    """Drop ``db_name`` (if it exists) and, with ``create``, create it anew, through ``admin_url``."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db_name)))
        if create:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))


def pg_settings(admin_url: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("select current_setting('server_version'), current_setting('synchronous_commit'), "
                           "current_setting('fsync')").fetchone()
    return f"PostgreSQL {row[0]} (synchronous_commit={row[1]}, fsync={row[2]})"


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{n} {version(n)}" for n in ["Django", "channels", "daphne", "channels-redis", "autogen-agentchat"])


# --- the Django helper process: requests over its pipe ----------------------------------------------


def login_users(token: str, users: int, name: str = "run-bench") -> dict:
    """In a helper process with Django set up: ``users`` new users, each logged in, and their session cookies."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client as DjangoClient

    cookies = []
    for i in range(users):
        user = get_user_model().objects.create_user(username=f"{name}-{token}-{i}")
        web = DjangoClient()
        web.force_login(user)
        cookies.append(web.cookies[settings.SESSION_COOKIE_NAME].value)
    limit = getattr(settings, "MAX_LIVE_RUNS_PER_USER", 0)
    return {"cookies": cookies, "vendor": connection.vendor, "live_limit": limit}


def serve_django_requests(conn, handlers: dict[str, Callable]) -> None:
    """The body of a :class:`PipeHelper` target: set Django up, then answer ``(name, *args)`` requests with
    ``handlers[name](*args)`` until ``("stop",)``; a failure is sent back with its traceback."""
    import django

    django.setup()
    import logging

    logging.getLogger("sessions").setLevel(logging.WARNING)
    while True:
        cmd = conn.recv()
        try:
            if cmd[0] == "stop":
                conn.send(("ok", None))
                return
            if cmd[0] not in handlers:
                raise ValueError(cmd[0])
            conn.send(("ok", handlers[cmd[0]](*cmd[1:])))
        except Exception:  # noqa: BLE001 - reported to the parent
            conn.send(("error", traceback.format_exc()))


# --- figures -------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (NaN for none)."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def print_table(cols: list[str], rows: list[list[str]]) -> None:
    """Columns padded to their widest cell; the first left-aligned, the others right-aligned."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
    for r in rows:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
