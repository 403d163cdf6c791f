"""Browser tier: a real ``manage.py serve`` (Daphne + embedded run worker) driven by Chromium.

The server runs in a subprocess with a database of its own:

* ``DATABASE_URL`` set to a PostgreSQL server: a fresh database
  ``cmbagent_e2e_<pid>`` is created on that server and dropped at teardown;
* otherwise a SQLite file inside a temporary ``CMBAGENT_VAR_DIR``.

``REDIS_URL`` is passed through (with a per-run ``CHANNELS_PREFIX``), so the
same tests run on the in-memory layer and on Redis.

These tests never touch the ORM: the pytest process's Django settings and
test database are unrelated to the server's. The database truth is read with
``manage.py shell -c`` subprocesses against the server's database.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.browser_support import (
    launch_chromium,
    log_in,
    remove_stale_failure_screenshots,
    save_screenshot,
    screenshot_failed_pages,
)

PROJECT_DIR = Path(__file__).resolve().parents[2]
MANAGE = PROJECT_DIR / "manage.py"
SERVER_START_TIMEOUT = 45.0
MANAGE_TIMEOUT = 120.0
# Generous for a loaded CI box; a normal run finishes its session in well under a second.
RUN_TIMEOUT_MS = 30_000

_DB_MARK = "@@E2E-JSON@@"
_FAILURES: list[str] = []  # node ids of failed tests, to print the server log at teardown


@dataclass(frozen=True)
class Account:
    username: str
    password: str


ALICE = Account("alice", "alice-e2e-Pa55word!")
BOB = Account("bob", "bob-e2e-Pa55word!")
# Staff with the approvals permission (the live approval queue; they decide any session's requests).
CAROL = Account("carol", "carol-e2e-Pa55word!")
DAVE = Account("dave", "dave-e2e-Pa55word!")
APPROVERS = (CAROL, DAVE)


def pytest_collection_modifyitems(config, items) -> None:
    """Everything in this directory drives a browser: mark it so ``-m "not browser"`` skips it."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item so fixtures can tell a failed test at teardown.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.failed:
        _FAILURES.append(item.nodeid)
    return report


# --- the server --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_url_with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


class _PostgresDatabase:
    """A throwaway database on the server ``DATABASE_URL`` points at."""

    def __init__(self, admin_url: str, label: str = "e2e") -> None:
        self.admin_url = admin_url
        self.name = f"cmbagent_{label}_{os.getpid()}"
        self.url = _pg_url_with_db(admin_url, self.name)

    def _execute(self, sql: str) -> None:
        import psycopg
        from psycopg import sql as pgsql

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(pgsql.SQL(sql).format(name=pgsql.Identifier(self.name)))

    def create(self) -> None:
        self._execute("DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self._execute("CREATE DATABASE {name}")

    def drop(self) -> None:
        self._execute("DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class E2EServer:
    url: str
    env: dict[str, str]
    var_dir: Path
    log_path: Path
    backend: str
    channel_layer: str
    process: subprocess.Popen | None = field(default=None, repr=False)

    def manage(self, *args: str, timeout: float = MANAGE_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``manage.py`` against the server's database; fail the test with its output on error."""
        proc = subprocess.run(
            [sys.executable, str(MANAGE), *args],
            cwd=PROJECT_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"manage.py {' '.join(args)[:200]} exited {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
            )
        return proc

    def shell_json(self, code: str) -> Any:
        """Run ``code`` in ``manage.py shell``; it must ``emit(value)`` once. Returns the value."""
        program = (
            "import json\n"
            f"def emit(value):\n    print({_DB_MARK!r} + json.dumps(value, default=str))\n"
            + code
        )
        out = self.manage("shell", "--no-imports", "-c", program).stdout
        for line in out.splitlines():
            if line.startswith(_DB_MARK):
                return json.loads(line[len(_DB_MARK):])
        pytest.fail(f"manage.py shell printed no result:\n{out[-4000:]}")

    def db_events(self, session_id: str) -> list[dict[str, Any]]:
        """The session's Event rows, in seq order, as the server's database holds them."""
        return self.shell_json(
            "from sessions.models import Event\n"
            f"emit(list(Event.objects.filter(session_id={session_id!r}).order_by('seq')"
            ".values('seq', 'kind', 'agent', 'content')))\n"
        )

    def db_session(self, session_id: str) -> dict[str, Any] | None:
        return self.shell_json(
            "from sessions.models import Session\n"
            f"emit(Session.objects.filter(pk={session_id!r}).values('status', 'last_seq', 'task', 'owner__username').first())\n"
        )

    def db_session_count(self, username: str) -> int:
        return self.shell_json(
            "from sessions.models import Session\n"
            f"emit(Session.objects.filter(owner__username={username!r}).count())\n"
        )

    def db_approval_requests(self, session_id: str) -> list[dict[str, Any]]:
        """The session's ApprovalRequest rows, oldest first, with who decided and through which door."""
        return self.shell_json(
            "from approvals.models import ApprovalRequest\n"
            f"emit(list(ApprovalRequest.objects.filter(session_id={session_id!r}).order_by('created_at')"
            ".values('id', 'kind', 'status', 'decision', 'feedback', 'door', 'decided_by__username', 'event_seq')))\n"
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _server_env(var_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("DATABASE_URL", "SQLITE_TEST_NAME", "RUNS_DIR", "CHANNELS_PREFIX", "SECRET_KEY"):
        env.pop(name, None)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "cmbagent_site.settings",
            "CMBAGENT_VAR_DIR": str(var_dir),
            "RUNS_DIR": str(var_dir / "runs"),
            "ALLOWED_HOSTS": "localhost,127.0.0.1",
            "EMBEDDED_WORKER": "1",
            "DEBUG": "1",
            "PYTHONUNBUFFERED": "1",
            "CHANNELS_PREFIX": f"e2e{os.getpid()}",
        }
    )
    return env


def _wait_healthy(proc: subprocess.Popen, url: str, deadline: float) -> str | None:
    """None once /healthz answers 200, else why not."""
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the server exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                body = json.loads(resp.read().decode())
                if resp.status == 200 and body.get("status") == "ok":
                    return None
                last = f"HTTP {resp.status}: {body}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = repr(exc)
        # Block on the process for a moment instead of sleeping: returns early if it dies.
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    return f"no healthy answer within {SERVER_START_TIMEOUT:.0f}s (last: {last})"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    # The server was started in a session of its own: its group is only it and its children.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def serve(extra_env: dict[str, str] | None = None, label: str = "e2e") -> Iterator[E2EServer]:
    """A live ``manage.py serve`` on a free port, with its own database, users alice and bob, and approvers carol and dave.

    ``extra_env`` is added to the server's environment (e.g. ``CMBAGENT_OFFLINE_LATENCY``); ``label``
    keeps its database, temporary folder and channel prefix apart from the other servers of this run.
    """
    var_dir = Path(tempfile.mkdtemp(prefix=f"cmbagent-{label}-"))
    env = _server_env(var_dir)
    env["CHANNELS_PREFIX"] = f"{label}{os.getpid()}"
    env.update(extra_env or {})
    database_url = os.environ.get("DATABASE_URL", "")
    pg: _PostgresDatabase | None = None
    if database_url.startswith("postgres"):
        pg = _PostgresDatabase(database_url, label)
        try:
            pg.create()
        except Exception as exc:  # noqa: BLE001 - reported as the fixture's failure
            pytest.fail(f"could not create the e2e database on {urlsplit(database_url).netloc}: {exc}")
        env["DATABASE_URL"] = pg.url
    redis_url = os.environ.get("REDIS_URL", "")
    port = _free_port()
    server = E2EServer(
        url=f"http://127.0.0.1:{port}",
        env=env,
        var_dir=var_dir,
        log_path=var_dir / "server.log",
        backend="postgresql" if pg else "sqlite",
        channel_layer="redis" if redis_url else "in-memory",
    )
    proc: subprocess.Popen | None = None
    try:
        server.manage("migrate", "--no-input")
        server.shell_json(
            "from django.contrib.auth import get_user_model\n"
            "User = get_user_model()\n"
            f"User.objects.create_user({ALICE.username!r}, password={ALICE.password!r})\n"
            f"User.objects.create_user({BOB.username!r}, password={BOB.password!r})\n"
            "from django.contrib.auth.models import Permission\n"
            "may_decide = Permission.objects.get(content_type__app_label='approvals', codename='approvals')\n"
            f"for name, password in {[(a.username, a.password) for a in APPROVERS]!r}:\n"
            "    User.objects.create_user(name, password=password, is_staff=True).user_permissions.add(may_decide)\n"
            "emit(sorted(User.objects.values_list('username', flat=True)))\n"
        )
        with server.log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(MANAGE), "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=PROJECT_DIR,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server.process = proc
        problem = _wait_healthy(proc, server.url, time.monotonic() + SERVER_START_TIMEOUT)
        if problem:
            pytest.fail(f"manage.py serve did not come up: {problem}\n--- server output ---\n{server.log()[-6000:]}")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        if _FAILURES or os.environ.get("E2E_SHOW_SERVER_LOG"):
            sys.stderr.write(f"\n--- e2e server output ({server.log_path}) ---\n{server.log()[-10000:]}\n")
        if pg is not None:
            try:
                pg.drop()
            except Exception as exc:  # noqa: BLE001 - do not hide the tests' own result
                sys.stderr.write(f"could not drop e2e database {pg.name}: {exc}\n")
        shutil.rmtree(var_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_server():
    """The browser tier's server (see ``serve``), shared by every test of the run."""
    with serve() as server:
        yield server


@pytest.fixture(scope="session")
def live_server_url(e2e_server: E2EServer) -> str:
    return e2e_server.url


# --- the browser -------------------------------------------------------------


@pytest.fixture(scope="package")
def browser():
    """Headless Chromium, closed when the tests of this package are done (why not session scope: launch_chromium)."""
    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def new_context(browser, request):
    """Make fresh browser contexts (cookies, storage) for this test; all closed at its end.

    On a failed test a screenshot of every open page goes to the artifacts folder.
    """
    contexts = []
    remove_stale_failure_screenshots(request.node.name)

    def make(**kwargs):
        ctx = browser.new_context(**kwargs)
        ctx.set_default_timeout(10_000)
        contexts.append(ctx)
        return ctx

    yield make
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        screenshot_failed_pages(contexts, request.node.name)
    for ctx in contexts:
        ctx.close()


@pytest.fixture
def context(new_context):
    """A fresh browser context for this test."""
    return new_context()


@pytest.fixture
def page(context):
    return context.new_page()


@pytest.fixture
def screenshot(request):
    """``screenshot(page, "name")`` saves a full-page PNG under <artifacts>/screenshots/."""

    def take(page, name: str) -> Path:
        return save_screenshot(page, request.node.name, name)

    return take


@pytest.fixture(scope="session")
def accounts() -> dict[str, Account]:
    return {"alice": ALICE, "bob": BOB, "carol": CAROL, "dave": DAVE}


@pytest.fixture
def login(live_server_url):
    """``login(page, account)`` logs in through the /login/ form and lands on the sessions list."""

    def do_login(page, account: Account) -> None:
        log_in(page, live_server_url, account.username, account.password)

    return do_login
