"""A server process SIGKILLed in the middle of live runs: every run ends well, and every page catches up.

Two Daphne servers (``serve --no-worker``) and two ``runworker`` processes on
PostgreSQL + Redis run four planning_and_control sessions with a slow offline
model. A Chromium page on server A follows one of them live; raw page sockets
on A (reconnecting with the last seq they show, as the page does) follow the
others. Mid-run server A is SIGKILLed (its whole process group), stays down a
moment and is started again on the same port, alone or together with a worker.

Afterwards every run has completed, one run per session, its seqs 1..n with
no gap, its team transcript equal to an uninterrupted run's; the page showed
"reconnecting", came back by itself (htmx reconnects after an abnormal close,
1006) and, never reloaded, shows exactly the database's transcript, each event
once; server B answered /healthz all through A's outage.
"""
from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import Page, expect

from tests.browser_support import (
    CONNECTION_PROBE,
    LIVE_PROBE,
    launch_chromium,
    log_in,
    remove_stale_failure_screenshots,
    save_screenshot,
    screenshot_failed_pages,
)
from tests.system.test_cluster import TASKS, _reference, _team_events
from tests.system.test_cluster_browser import ALICE, _db_events, _watched_to_the_end
from tests.system.test_faults import Page as SocketPage

pytestmark = pytest.mark.browser

# Seconds per offline model reply: a planning_and_control run (12 replies and a code run) lasts
# well over ten seconds, so a kill lands mid-run and the runs go on after the server is back.
LATENCY = "0.8"
OUTAGE_SECONDS = 1.5  # how long server A stays down before it is started again (plus its start-up)
SESSION_TASKS = TASKS[:4]
RUN_TIMEOUT = 120  # seconds, for every run to complete on a busy 2-core box
RECONNECT_TIMEOUT_MS = 90_000  # htmx backs off (full jitter, doubling) while the server is down


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each task's uninterrupted team transcript, computed from the start in a thread of its own
    (while Playwright's sync API is open, ``asyncio.run`` cannot be called in this thread)."""

    def compute() -> dict[str, list[tuple]]:
        return {task: _reference(tmp_path_factory.mktemp("reference"), task, "planning_and_control") for task in SESSION_TASKS}

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(compute)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for this module only (see tests/browser_support.launch_chromium)."""
    with launch_chromium() as browser:
        yield browser


class Watchers:
    """The browser pages and raw page sockets of one test."""

    def __init__(self, browser) -> None:
        self.browser = browser
        self.contexts: list = []
        self.sockets: list[SocketPage] = []

    def page(self) -> Page:
        ctx = self.browser.new_context()
        ctx.set_default_timeout(30_000)
        ctx.add_init_script(LIVE_PROBE)
        ctx.add_init_script(CONNECTION_PROBE)
        self.contexts.append(ctx)
        return ctx.new_page()

    def socket(self, server: str, cookie: str, session_id: str) -> SocketPage:
        page = SocketPage(server, cookie, session_id)
        self.sockets.append(page)
        page.start()
        return page

    def close(self) -> None:
        for page in self.sockets:
            page.stop()
        for ctx in self.contexts:
            try:
                ctx.close()
            except Exception:  # noqa: BLE001 - already closed
                pass


@pytest.fixture
def watchers(browser, cluster, request):
    """Closed at the test's end, before the cluster stops; on a failure, screenshots and the process logs."""
    remove_stale_failure_screenshots(request.node.name)
    w = Watchers(browser)
    yield w
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        screenshot_failed_pages(w.contexts, request.node.name)
        for name in sorted(cluster.processes):
            sys.stderr.write(f"\n--- {name} ---\n{cluster.log(name)}\n")
    w.close()


# --- helpers --------------------------------------------------------------------


def _healthz(server: str) -> int | None:
    """The status /healthz answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(server + "/healthz", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class HealthWatch(threading.Thread):
    """Asks a server's /healthz every 0.2 s until stopped; ``answers`` lists what it said."""

    def __init__(self, server: str) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.answers: list[int | None] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.answers.append(_healthz(self.server))
            self._halt.wait(0.2)

    def stop(self) -> list[int | None]:
        self._halt.set()
        self.join(timeout=10)
        return self.answers


def _start_sessions(cluster, tasks: list[str]) -> list[str]:
    """Start the sessions from one shell (one process start-up), so their runs go side by side."""
    return cluster.shell(
        "from django.contrib.auth.models import User\nfrom sessions import services\nalice = User.objects.get(username='alice')\n"
        f"emit([str(services.session_start(owner=alice, task=task, mode='planning_and_control').pk) for task in {tasks!r}])"
    )


def _progress(cluster, sessions: list[str]) -> dict[str, tuple[int, str]]:
    rows = cluster.sql("SELECT id::text, last_seq, status FROM agent_sessions_session WHERE id::text = ANY(%s)", sessions)
    return {session_id: (seq, status) for session_id, seq, status in rows}


def _run_owners(cluster, sessions: list[str]) -> dict[str, str]:
    """The worker holding each session's running run right now."""
    rows = cluster.sql(
        "SELECT session_id::text, lease_owner FROM agent_sessions_run WHERE session_id::text = ANY(%s) AND status = 'running' AND lease_owner <> ''",
        sessions,
    )
    return dict(rows)


def _taken_over(cluster, sessions: list[str]) -> dict[str, int]:
    return dict(cluster.sql(
        "SELECT session_id::text, count(*) FROM agent_sessions_event WHERE session_id::text = ANY(%s) "
        "AND kind = 'status' AND content LIKE 'Taken over%%' GROUP BY 1",
        sessions,
    ))


class Scene:
    """Servers A and B, workers 1 and 2, four live runs; a browser page and raw sockets on A watching them."""

    def __init__(self, cluster, watchers: Watchers) -> None:
        self.cluster = cluster
        cluster.env["CMBAGENT_OFFLINE_LATENCY"] = LATENCY
        self.a = cluster.start_server("server-a")
        self.b = cluster.start_server("server-b")
        cluster.start_worker("worker-1")
        cluster.start_worker("worker-2")

        self.page = watchers.page()
        log_in(self.page, self.a, *ALICE)
        cookie = next(c["value"] for c in self.page.context.cookies() if c["name"] == "sessionid")
        self.sessions = _start_sessions(cluster, SESSION_TASKS)
        self.watched = self.sessions[0]
        self.page.goto(f"{self.a}/sessions/{self.watched}/")
        expect(self.page.locator("#connection")).to_have_attribute("data-state", "live")
        self.page.evaluate("window.__e2e_same_document = true")
        self.sockets = [watchers.socket(self.a, cookie, s) for s in self.sessions[1:]]
        cluster.wait_until(lambda: all(s.connects >= 1 for s in self.sockets), 30, "the raw sockets to connect")

    def wait_mid_run(self) -> None:
        """Until the watched run is well under way (and the page shows part of it), with every run going."""

        def under_way() -> bool:
            progress = _progress(self.cluster, self.sessions)
            seq, status = progress[self.watched]
            assert status in ("queued", "running"), f"the watched run ended {status} before the kill"
            return seq >= 6 and all(s == "running" for _, s in progress.values())

        self.cluster.wait_until(under_way, 60, "every run to be under way")
        expect(self.page.locator("#transcript article[data-seq]")).not_to_have_count(0)

    def kill_and_restart_server_a(self, *, worker: str | None = None) -> dict:
        """SIGKILL server A (and ``worker``), keep it down a moment, start it again on the same port.

        Returns what was seen: seqs at the kill and at the restart, B's answers, the page's connection states.
        """
        cluster, page = self.cluster, self.page
        states_before = page.evaluate("window.__connection.length")
        health_b = HealthWatch(self.b)
        health_b.start()
        at_kill = _progress(cluster, self.sessions)
        port = cluster.ports["server-a"]
        cluster.kill("server-a")
        if worker is not None:
            cluster.kill(worker)
        killed_at = time.monotonic()
        assert all(status == "running" for _, status in at_kill.values()), f"a run had ended before the kill: {at_kill}"
        assert _healthz(self.a) is None, "server A still answers after SIGKILL"

        # The page notices by itself: its socket closed abnormally, and it says so while it retries.
        page.wait_for_function(
            "n => window.__connection.slice(n).includes('reconnecting')", arg=states_before, timeout=30_000
        )
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - killed_at)))  # the outage itself, not a wait for anything
        if worker is not None:
            cluster.start_worker(worker)
        assert cluster.start_server("server-a") == self.a and cluster.ports["server-a"] == port
        at_restart = _progress(cluster, self.sessions)
        outage = time.monotonic() - killed_at
        answers_b = health_b.stop()

        expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=RECONNECT_TIMEOUT_MS)
        states = page.evaluate("window.__connection")
        return {"at_kill": at_kill, "at_restart": at_restart, "answers_b": answers_b, "outage": outage,
                "states": states, "states_before": states_before}

    def check_the_end(self, seen: dict, references) -> dict:
        """Every run completed, once, with the reference transcript; the page and the sockets show it all, once."""
        cluster, page = self.cluster, self.page
        cluster.wait_until(
            lambda: {s for _, s in _progress(cluster, self.sessions).values()} == {"completed"}, RUN_TIMEOUT, "every session to complete"
        )

        # B answered all through A's outage.
        assert seen["answers_b"] and set(seen["answers_b"]) == {200}, seen["answers_b"]
        assert _healthz(self.a) == 200 and _healthz(self.b) == 200
        # The page went from live to reconnecting while A was down, and came back live by itself.
        after_kill = seen["states"][seen["states_before"] - 1:]
        assert after_kill[0] == "live" and "reconnecting" in after_kill and after_kill[-1] == "live", seen["states"]

        # The runs: one each, completed, seqs 1..n, the team's transcript equal to an uninterrupted run's.
        refs = references.result(timeout=120)
        runs = dict(cluster.sql(
            "SELECT session_id::text, array_agg(status) FROM agent_sessions_run WHERE session_id::text = ANY(%s) GROUP BY 1", self.sessions
        ))
        assert runs == {s: ["completed"] for s in self.sessions}, runs
        for session_id, task in zip(self.sessions, SESSION_TASKS):
            rows = cluster.events(session_id)
            assert [seq for seq, *_ in rows] == list(range(1, len(rows) + 1)), session_id
            assert _team_events(rows) == refs[task], session_id

        # The browser page, never reloaded, caught up: the database's transcript, each event once, completed.
        db_events = _db_events(cluster, self.watched)
        probe = _watched_to_the_end(page, db_events)
        at_kill, at_restart = seen["at_kill"][self.watched][0], seen["at_restart"][self.watched][0]
        added = set(probe["addedSeqs"])
        assert set(range(at_kill + 1, len(db_events) + 1)) <= added, "events after the kill did not come over the socket"

        # The raw sockets reconnected saying their last seq, and got every row exactly once.
        for socket_page in self.sockets:
            last = len(cluster.events(socket_page.session_id))
            cluster.wait_until(
                lambda p=socket_page, n=last: p.connects >= 2 and p.cursor >= n, 60, f"the socket of {socket_page.session_id} to catch up"
            )
            socket_page.stop()
            assert socket_page.seqs == list(range(1, last + 1)), (socket_page.connects, socket_page.seqs)
        return {"watched": (at_kill, at_restart, len(db_events)), "outage": round(seen["outage"], 1), "probe": probe}


# --- the tests ------------------------------------------------------------------


def test_server_killed_mid_run_runs_go_on_and_pages_catch_up(cluster, references, watchers, request):
    """SIGKILL server A mid-run: the workers, separate processes, carry every run on uninterrupted; the page
    on A says reconnecting, comes back by itself once A is up again and shows the rest."""
    scene = Scene(cluster, watchers)
    scene.wait_mid_run()
    seen = scene.kill_and_restart_server_a()
    # The runs went on while A was down: events were written meanwhile.
    assert seen["at_restart"][scene.watched][0] > seen["at_kill"][scene.watched][0], seen
    save_screenshot(scene.page, request.node.name, "reconnected")

    summary = scene.check_the_end(seen, references)
    # Nothing was interrupted: no run was taken over.
    assert _taken_over(cluster, scene.sessions) == {}
    print(f"watched seq at kill / restart / end: {summary['watched']}; outage {summary['outage']} s; "
          f"page states {seen['states']}; socket connects {[p.connects for p in scene.sockets]}")


def test_server_and_worker_killed_at_once_mid_run(cluster, references, watchers, request):
    """SIGKILL server A and the worker holding the watched run together: that worker's runs are taken over
    from their logs (once each) and complete with the uninterrupted transcript; the page catches up."""
    scene = Scene(cluster, watchers)
    scene.wait_mid_run()
    owners = _run_owners(cluster, scene.sessions)
    assert scene.watched in owners, owners
    victim_pid = int(owners[scene.watched].split(":")[1])
    victim = next(name for name, p in cluster.processes.items() if name.startswith("worker") and p.pid == victim_pid)
    held = {s for s, owner in owners.items() if int(owner.split(":")[1]) == victim_pid}

    seen = scene.kill_and_restart_server_a(worker=victim)
    save_screenshot(scene.page, request.node.name, "reconnected")
    summary = scene.check_the_end(seen, references)

    # The victim's runs (and only those) were taken over, each once; the others ran on undisturbed.
    taken_over = _taken_over(cluster, scene.sessions)
    assert scene.watched in taken_over, taken_over
    assert set(taken_over) <= held and set(taken_over.values()) == {1}, (taken_over, held)
    print(f"victim {victim} held {len(held)} run(s), taken over: {len(taken_over)}; watched seq at kill / restart / end: "
          f"{summary['watched']}; outage {summary['outage']} s; page states {seen['states']}")
