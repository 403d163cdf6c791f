"""System tier: real processes (Daphne servers, runworker processes) on PostgreSQL + Redis.

Each test gets a cluster of its own: a fresh database ``cmbagent_sys_<pid>`` on
the PostgreSQL server of ``DATABASE_URL`` and its own channel prefix on the
Redis of ``REDIS_URL``. The tier runs in ``make test``'s PostgreSQL + Redis
tier; without them it fails under CI and is skipped elsewhere.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
MANAGE = str(PROJECT_DIR / "manage.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """Servers and workers sharing one database and one channel layer; each can be killed and restarted."""

    def __init__(self, pg_url: str, redis_url: str, var_dir: Path) -> None:
        parts = urlsplit(pg_url.replace("postgres://", "postgresql://", 1))
        self.admin_url = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
        self.db_name = f"cmbagent_sys_{os.getpid()}"
        self.db_url = urlunsplit((parts.scheme, parts.netloc, "/" + self.db_name, "", ""))
        self.var_dir = var_dir
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("SQLITE_TEST_NAME", "SECRET_KEY")},
            "DJANGO_SETTINGS_MODULE": "cmbagent_site.settings",
            "DATABASE_URL": self.db_url,
            "REDIS_URL": redis_url,
            "CHANNELS_PREFIX": f"sys{os.getpid()}",
            "CMBAGENT_VAR_DIR": str(var_dir),
            "RUNS_DIR": str(var_dir / "runs"),
            "EMBEDDED_WORKER": "0",
            "DEBUG": "1",
            "ALLOWED_HOSTS": "localhost,127.0.0.1",
            "PYTHONUNBUFFERED": "1",
            "WORKER_LEASE_SECONDS": "6",
            "CMBAGENT_OFFLINE_LATENCY": "0.03",
            "MAX_LIVE_RUNS_PER_USER": "0",  # one user starts every session of these tests
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self._db = None

    # --- the database ---------------------------------------------------------

    def _admin(self, statement: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL(statement).format(name=sql.Identifier(self.db_name)))

    def create(self) -> None:
        self._admin("DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self._admin("CREATE DATABASE {name}")
        self.manage("migrate", "--no-input", "-v0")
        self.shell("from django.contrib.auth.models import User\nUser.objects.create_user('alice', password='x-Pa55word!')\nemit(1)")

    def destroy(self) -> None:
        self.stop_all()
        if self._db is not None:
            self._db.close()
        self._admin("DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def sql(self, query: str, *params: Any) -> list[tuple]:
        import psycopg

        if self._db is None or self._db.closed:
            self._db = psycopg.connect(self.db_url, autocommit=True, connect_timeout=10)
        cursor = self._db.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    def manage(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run([sys.executable, MANAGE, *args], cwd=PROJECT_DIR, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            pytest.fail(f"manage.py {args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def shell(self, code: str) -> Any:
        """Run ``code`` in ``manage.py shell`` against the cluster's database; it calls ``emit(value)``."""
        program = "import json\ndef emit(value):\n    print('@@' + json.dumps(value, default=str))\n" + code
        for line in self.manage("shell", "--no-imports", "-c", program).splitlines():
            if line.startswith("@@"):
                return json.loads(line[2:])
        pytest.fail("the shell emitted nothing")

    # --- processes ------------------------------------------------------------

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.var_dir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, MANAGE, *args], cwd=PROJECT_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_server(self, name: str) -> str:
        port = self.ports.setdefault(name, _free_port())
        self._spawn(name, "serve", "--no-worker", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return url
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"{name} did not start:\n{self.log(name)}")

    def start_worker(self, name: str) -> None:
        self._spawn(name, "runworker", "orchestrator")

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name)

    def log(self, name: str) -> str:
        path = self.var_dir / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    # --- what the database says -------------------------------------------------

    def start_session(self, task: str, mode: str, config: dict | None = None) -> str:
        return self.shell(
            "from django.contrib.auth.models import User\nfrom sessions import services\n"
            f"s = services.session_start(owner=User.objects.get(username='alice'), task={task!r}, mode={mode!r}, config={config or {}!r})\n"
            "emit(str(s.pk))"
        )

    def status(self, session_id: str) -> str:
        return self.sql("SELECT status FROM agent_sessions_session WHERE id = %s", session_id)[0][0]

    def events(self, session_id: str) -> list[tuple]:
        return self.sql("SELECT seq, kind, agent, content FROM agent_sessions_event WHERE session_id = %s ORDER BY seq", session_id)

    def wait_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        logs = "\n".join(f"--- {name} ---\n{self.log(name)}" for name in sorted(self.processes))
        pytest.fail(f"timed out waiting for {what}\n{logs}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item, so a fixture can tell a failed test at teardown.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _needs(url: str, what: str) -> None:
    if url:
        return
    message = f"the system tier needs {what}; it runs in make test's PostgreSQL + Redis tier"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def cluster():
    pg_url = os.environ.get("DATABASE_URL", "")
    _needs(pg_url if pg_url.startswith("postgres") else "", "PostgreSQL (DATABASE_URL)")
    _needs(os.environ.get("REDIS_URL", ""), "Redis (REDIS_URL)")
    with tempfile.TemporaryDirectory(prefix="cmbagent-sys-") as tmp:
        c = Cluster(pg_url, os.environ["REDIS_URL"], Path(tmp))
        c.create()
        try:
            yield c
        finally:
            c.destroy()
