"""Redis and PostgreSQL go away in the middle of live runs and come back: the cluster recovers by itself.

The machine's shared PostgreSQL and Redis serve other suites at the same
time, so each test here starts private ones on free loopback ports and
stops and starts *those*: a Redis that is killed and started again on the
same port (empty, as after a crash without persistence), and a PostgreSQL
cluster of its own (``initdb`` in a temp dir) that is shut down and started
again. Like the rest of the system tier, this runs in ``make test``'s
PostgreSQL + Redis tier (DATABASE_URL / REDIS_URL set); a missing
``redis-server`` or PostgreSQL binary fails under CI and skips elsewhere.
"""
from __future__ import annotations

import base64
import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.system.conftest import Cluster, _free_port, _needs
from tests.system.test_cluster import TASKS, _reference, _team_events

OUTAGE_SECONDS = 3.0
LATENCY = "0.4"  # seconds per offline model reply: a run lasts several seconds, so an outage lands mid-run
SEQ_RE = re.compile(rb'<article[^>]*\bdata-seq="(\d+)"')  # one transcript row per event


def _require(found: str | None, what: str) -> str:
    """``found``, or fail (under CI) or skip saying what is missing."""
    if found:
        return found
    message = f"the fault tests need {what}"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message)
    pytest.skip(message)


def _postgres_bin_dir() -> str | None:
    """Where initdb and pg_ctl are: Debian's newest /usr/lib/postgresql/<version>/bin, else the PATH."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb") if (Path(p).parent / "pg_ctl").exists()]
    if found:
        newest = max(found, key=lambda d: [int(x) for x in re.findall(r"\d+", d.parent.name)] or [0])
        return str(newest)
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb and shutil.which("pg_ctl") else None


# --- private services -----------------------------------------------------------


class PrivateRedis:
    """A throwaway redis-server on a loopback port of its own, with no persistence."""

    def __init__(self, binary: str, log_dir: Path) -> None:
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_dir / "redis.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"redis-server did not start on port {self.port}:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Gone at once, as in a crash: every client connection is cut."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb in /tmp) on a loopback port of its own."""

    def __init__(self, bin_dir: str) -> None:
        self.bin_dir = Path(bin_dir)
        self.root = os.geteuid() == 0
        # Not pytest's tmp_path: its parents may be 0700, and the server runs as postgres.
        self.dir = Path(tempfile.mkdtemp(prefix="cmbagent-pg-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.port = _free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        if self.root:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)

    def _run(self, program: str, *args: str, timeout: float = 120) -> None:
        command = [str(self.bin_dir / program), *args]
        if self.root:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode:
            log = (self.dir / "log").read_text(errors="replace")[-3000:] if (self.dir / "log").exists() else ""
            pytest.fail(f"{program} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{log}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Shut down: ``fast`` ends every backend (their clients see the connection drop) without waiting."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.running():
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class FaultCluster(Cluster):
    """A Cluster whose own reads survive the database going away (they wait for it to return)."""

    def sql(self, query: str, *params: Any) -> list[tuple]:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                return super().sql(query, *params)
            except psycopg.OperationalError:
                if self._db is not None:
                    with contextlib.suppress(Exception):
                        self._db.close()
                self._db = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def healthz(self, server: str, timeout: float = 3) -> int | None:
        """The status /healthz answers with, or None if the server did not answer at all."""
        try:
            with urllib.request.urlopen(server + "/healthz", timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def login_cookie(self) -> str:
        return self.shell(
            "from django.conf import settings\nfrom django.contrib.auth.models import User\nfrom django.test import Client\n"
            "web = Client()\nweb.force_login(User.objects.get(username='alice'))\n"
            "emit(web.cookies[settings.SESSION_COOKIE_NAME].value)"
        )

    def start_sessions(self, tasks: list[str], mode: str = "planning_and_control") -> list[str]:
        """Start several sessions from one shell (one process start-up, so they run side by side)."""
        return self.shell(
            "from django.contrib.auth.models import User\nfrom sessions import services\nalice = User.objects.get(username='alice')\n"
            f"emit([str(services.session_start(owner=alice, task=task, mode={mode!r}).pk) for task in {tasks!r}])"
        )

    def last_seqs(self, sessions: list[str]) -> dict[str, int]:
        rows = self.sql("SELECT id::text, last_seq FROM agent_sessions_session WHERE id::text = ANY(%s)", sessions)
        return dict(rows)

    def statuses(self, sessions: list[str]) -> dict[str, str]:
        rows = self.sql("SELECT id::text, status FROM agent_sessions_session WHERE id::text = ANY(%s)", sessions)
        return dict(rows)

    def running_with_events(self, sessions: list[str], at_least: int = 4) -> list[str]:
        """Sessions whose run a worker holds right now, with ``at_least`` events already written."""
        rows = self.sql(
            "SELECT s.id::text FROM agent_sessions_session s JOIN agent_sessions_run r ON r.session_id = s.id "
            "WHERE s.id::text = ANY(%s) AND r.status = 'running' AND r.lease_owner <> '' AND s.last_seq >= %s",
            sessions, at_least,
        )
        return [session_id for (session_id,) in rows]


class WebSocket:
    """A minimal RFC 6455 client (text frames, one socket, blocking): enough to watch a session's pushes."""

    def __init__(self, server: str, path: str, cookie: str, timeout: float = 10) -> None:
        parts = urlsplit(server)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {server}\r\n"
                f"Cookie: sessionid={cookie}\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection during the handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"handshake refused: {head[:200]!r}")
        self.close_code: int | None = None

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = bytes([0x80 | opcode, 0x80 | length])
        elif length < 65536:
            header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send_json(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def receive(self, timeout: float) -> bytes | None:
        """The next text message; None when nothing came within ``timeout``. A close raises ConnectionError."""
        self.sock.settimeout(timeout)
        message = b""
        try:
            while True:
                first, second = self._read(2)
                opcode, length = first & 0x0F, second & 0x7F
                if length == 126:
                    length = int.from_bytes(self._read(2), "big")
                elif length == 127:
                    length = int.from_bytes(self._read(8), "big")
                payload = self._read(length)
                if opcode == 0x8:
                    self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    raise ConnectionError(f"the server closed the socket ({self.close_code})")
                if opcode == 0x9:
                    self._send_frame(0xA, payload)
                    continue
                if opcode == 0xA:
                    continue
                message += payload
                if first & 0x80:
                    return message
        except (TimeoutError, socket.timeout):
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, (1000).to_bytes(2, "big"))
        self.sock.close()


# --- fixtures -------------------------------------------------------------------


def _service_urls() -> None:
    """The same gate as the ``cluster`` fixture: the system tier runs with PostgreSQL + Redis configured."""
    pg_url = os.environ.get("DATABASE_URL", "")
    _needs(pg_url if pg_url.startswith("postgres") else "", "PostgreSQL (DATABASE_URL)")
    _needs(os.environ.get("REDIS_URL", ""), "Redis (REDIS_URL)")


@pytest.fixture
def private_redis(tmp_path):
    _service_urls()
    redis = PrivateRedis(_require(shutil.which("redis-server"), "redis-server on PATH"), tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.kill()


@pytest.fixture
def private_postgres():
    _service_urls()
    bin_dir = _require(_postgres_bin_dir(), "PostgreSQL's initdb and pg_ctl (/usr/lib/postgresql/*/bin or the PATH)")
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: it runs as the postgres user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _require(None, "a postgres user to run a private PostgreSQL as (the tests run as root)")
        _require(shutil.which("runuser"), "runuser, to run a private PostgreSQL as the postgres user")
    pg = PrivatePostgres(bin_dir)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def fault_cluster(private_postgres, private_redis):
    """A cluster on the private PostgreSQL and Redis, which the test may stop and start."""
    with tempfile.TemporaryDirectory(prefix="cmbagent-faults-") as tmp:
        c = FaultCluster(private_postgres.url, private_redis.url, Path(tmp))
        c.env["CMBAGENT_OFFLINE_LATENCY"] = LATENCY
        try:
            c.create()
            yield c
        finally:
            c.stop_all()
            if c._db is not None:
                with contextlib.suppress(Exception):
                    c._db.close()




class Page(threading.Thread):
    """A session page's socket, as the browser keeps it: reconnect when it closes, saying the last seq shown.

    ``seqs`` lists every transcript row pushed, in order, across reconnects.
    """

    def __init__(self, server: str, cookie: str, session_id: str) -> None:
        super().__init__(daemon=True)
        self.server, self.cookie, self.session_id = server, cookie, session_id
        self.seqs: list[int] = []
        self.connects = 0
        self.first_batch: int | None = None  # rows in the first message: the catch-up after the hello
        self._halt = threading.Event()

    @property
    def cursor(self) -> int:
        return max(self.seqs, default=0)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                ws = WebSocket(self.server, f"/ws/sessions/{self.session_id}/", self.cookie)
            except OSError:
                time.sleep(0.5)
                continue
            self.connects += 1
            try:
                ws.send_json(f'{{"type": "hello", "after": {self.cursor}}}')
                while not self._halt.is_set():
                    message = ws.receive(timeout=0.5)
                    if message is not None:
                        self.seqs += [int(seq) for seq in SEQ_RE.findall(message)]
                        if self.first_batch is None:
                            self.first_batch = len(self.seqs)
            except OSError:
                time.sleep(0.5)  # closed by the server: the page reconnects after a moment
            finally:
                ws.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def _check_transcripts(cluster: FaultCluster, sessions: list[str], tmp_path: Path) -> None:
    """Each session's seqs run 1..n with no gap, and its team transcript is the uninterrupted one."""
    references: dict[str, list[tuple]] = {}
    for session_id in sessions:
        task = cluster.sql("SELECT task FROM agent_sessions_session WHERE id = %s", session_id)[0][0]
        if task not in references:
            references[task] = _reference(tmp_path / f"reference-{len(references)}", task, "planning_and_control")
        rows = cluster.events(session_id)
        assert [seq for seq, *_ in rows] == list(range(1, len(rows) + 1)), session_id
        assert _team_events(rows) == references[task], session_id


def _page_shows_everything(cluster: FaultCluster, page: Page) -> None:
    """Once its session has ended, the page shows every row exactly once."""
    last = cluster.last_seqs([page.session_id])[page.session_id]
    cluster.wait_until(lambda: page.cursor >= last, 30, f"the page of {page.session_id} to show seq {last}")
    page.stop()
    assert page.seqs == list(range(1, last + 1)), (page.connects, page.seqs)


def _drop_the_connection_inside_a_write(cluster: FaultCluster, session_id: str) -> None:
    """What a restart can do to one event write, made certain: its connection dies inside its transaction.

    The test holds the session's row lock, so the worker's next event write
    waits inside its transaction; then it ends that backend (as a shutdown
    does) while the server stays up, so the worker's very next statement finds
    the database answering again.
    """
    import psycopg

    with psycopg.connect(cluster.db_url, connect_timeout=10) as lock:
        lock.execute("SELECT 1 FROM agent_sessions_session WHERE id = %s FOR UPDATE", (session_id,))
        waiting: list[tuple] = []

        def worker_waits() -> bool:
            # Whoever waits for this lock, first come first: the run's next write (polled every 50 ms, well
            # before its lease, which its waiting worker cannot renew, lets another worker's claim queue up
            # too). Not found by the text of the query, which PostgreSQL cuts at track_activity_query_size.
            waiting[:] = cluster.sql(
                "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid)) ORDER BY query_start",
                lock.info.backend_pid,
            )
            return bool(waiting)

        cluster.wait_until(worker_waits, 30, "the worker's event write to wait for the row lock")
        assert cluster.sql("SELECT pg_terminate_backend(%s)", waiting[0][0]) == [(True,)]
        lock.rollback()


# --- the tests ------------------------------------------------------------------


@pytest.fixture
def pages():
    """Pages a test opens; stopped at its end, whatever happened."""
    opened: list[Page] = []
    try:
        yield opened
    finally:
        for page in opened:
            page.stop()


def test_redis_restart_mid_run(fault_cluster, private_redis, pages, tmp_path):
    cluster, redis = fault_cluster, private_redis
    servers = [cluster.start_server("server-a"), cluster.start_server("server-b")]
    cluster.start_worker("worker-1")
    cluster.start_worker("worker-2")
    cookie = cluster.login_cookie()
    sessions = cluster.start_sessions(TASKS[:5])

    cluster.wait_until(lambda: len(cluster.running_with_events(sessions)) >= 2, 60, "runs under way")
    watched = Page(servers[0], cookie, cluster.running_with_events(sessions)[0])  # a page left open through the outage
    pages.append(watched)
    watched.start()
    cluster.wait_until(lambda: watched.first_batch is not None, 30, "the page to show its session")
    caught = cluster.running_with_events(sessions)
    assert watched.session_id in caught, "the page's session ended before the outage"
    before = cluster.last_seqs(sessions)
    redis.kill()
    down_at = time.monotonic()
    answers: list[int | None] = []
    while time.monotonic() - down_at < OUTAGE_SECONDS:
        answers += [cluster.healthz(server) for server in servers]
        time.sleep(0.3)
    during = cluster.last_seqs(sessions)
    redis.start()
    # The servers answered all along, and the workers, which write to the database
    # rather than to Redis, went on with the runs during the outage.
    assert answers and set(answers) == {200}, answers
    assert any(during[s] > before[s] for s in caught), (before, during)

    # A session started after Redis came back is claimed, run, and pushed live to a page on the other server.
    fresh = cluster.start_session(TASKS[5], "planning_and_control")
    page = Page(servers[1], cookie, fresh)
    pages.append(page)
    page.start()
    sessions.append(fresh)
    cluster.wait_until(lambda: set(cluster.statuses(sessions).values()) == {"completed"}, 90, "every session to complete")
    _page_shows_everything(cluster, page)
    assert page.first_batch is not None and page.first_batch < len(page.seqs), "nothing was pushed live after the hello"
    # The page open through the outage (its socket closed when Redis went away; it reconnected
    # saying the last seq it showed) shows every row exactly once: no gap, no repeat.
    _page_shows_everything(cluster, watched)
    print(f"caught mid-run: {len(caught)}; page connects: {watched.connects}; fresh page: {page.first_batch} rows at hello, {len(page.seqs)} in all")
    assert [cluster.healthz(server) for server in servers] == [200, 200]
    # Redis carries only wake-ups and push notes: no run was interrupted, none had to be taken over.
    assert cluster.sql("SELECT count(*) FROM agent_sessions_run")[0][0] == len(sessions)
    assert cluster.sql("SELECT count(*) FROM agent_sessions_event WHERE kind = 'status' AND content LIKE 'Taken over%%'")[0][0] == 0
    _check_transcripts(cluster, sessions, tmp_path)


def test_postgres_restart_mid_run(fault_cluster, private_postgres, tmp_path):
    cluster, pg = fault_cluster, private_postgres
    servers = [cluster.start_server("server-a"), cluster.start_server("server-b")]
    cluster.start_worker("worker-1")
    cluster.start_worker("worker-2")
    sessions = cluster.start_sessions(TASKS[:5])

    cluster.wait_until(lambda: len(cluster.running_with_events(sessions)) >= 2, 60, "runs under way")
    # Every run a worker holds as the database goes: which of them the outage interrupts depends on
    # whose write each worker's one database thread was making then (the others' writes wait behind
    # it and may find the database back), not on how many events each had written.
    caught = cluster.running_with_events(sessions, at_least=0)
    pg.stop("fast")
    down_at = time.monotonic()
    answers: list[int | None] = []
    while time.monotonic() - down_at < OUTAGE_SECONDS:
        answers += [cluster.healthz(server) for server in servers]
        time.sleep(0.3)
    pg.start()
    # The servers kept answering (unhealthy, and saying so), and are healthy again once it is back.
    assert answers and set(answers) == {503}, answers
    cluster.wait_until(lambda: [cluster.healthz(server) for server in servers] == [200, 200], 15, "/healthz to answer 200 again")

    # Then quick restarts, each well under a second, while runs are still going: an append may fail
    # at any instant of one, and the next write may find the database already back.
    bounces = 0
    while bounces < 3 and cluster.running_with_events(sessions):
        pg.stop("fast")
        pg.start()
        bounces += 1
        time.sleep(1.5)

    # A session started after the restarts is claimed and run like any other, and
    # survives its connection dying in the middle of one of its writes.
    (fresh,) = cluster.start_sessions(TASKS[5:6])
    sessions.append(fresh)
    cluster.wait_until(lambda: cluster.running_with_events([fresh]), 60, "the new session's run to be under way")
    _drop_the_connection_inside_a_write(cluster, fresh)
    cluster.wait_until(
        lambda: set(cluster.statuses(sessions).values()) <= {"completed", "failed"}, 90, "every session to end"
    )
    # Nobody had to Retry: a lost database is not the run's failure. Each interrupted run was
    # taken over from its log once the database answered, and finished by itself.
    failures = cluster.sql("SELECT s.id::text, r.error FROM agent_sessions_run r JOIN agent_sessions_session s ON s.id = r.session_id WHERE r.status = 'failed'")
    assert failures == [], failures
    assert set(cluster.statuses(sessions).values()) == {"completed"}
    taken_over = dict(cluster.sql(
        "SELECT session_id::text, count(*) FROM agent_sessions_event WHERE kind = 'status' AND content LIKE 'Taken over%%' GROUP BY 1"
    ))
    assert set(caught) & set(taken_over), "no run caught by the outage was interrupted: the restart missed them"
    assert taken_over.get(fresh) == 1, taken_over
    print(f"caught mid-run: {len(caught)}; quick restarts: {bounces}; sessions taken over: {len(taken_over)}")
    assert [cluster.healthz(server) for server in servers] == [200, 200]
    _check_transcripts(cluster, sessions, tmp_path)

