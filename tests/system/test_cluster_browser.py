"""Chromium against a cluster: several Daphne servers and several run workers on PostgreSQL + Redis.

No server runs a worker (``serve --no-worker``, ``EMBEDDED_WORKER=0``): every
event a page shows was written by a ``runworker`` process and reached the
page's server through the Redis channel layer. Closing the browser mid-run
stops nothing: coming back later (through another server) shows everything,
and the page goes on live to the end.
"""
from __future__ import annotations

import sys
import time

import pytest
from playwright.sync_api import Page, expect

from tests.browser_support import (
    LIVE_PROBE,
    assert_matches_db,
    dom_transcript,
    launch_chromium,
    log_in,
    remove_stale_failure_screenshots,
    rows,
    save_screenshot,
    screenshot_failed_pages,
    start_session,
)

pytestmark = pytest.mark.browser

ALICE = ("alice", "x-Pa55word!")  # made by the cluster fixture
RUN_TIMEOUT_MS = 45_000
# Seconds per reply of the offline model: slow enough that a planning_and_control run
# lasts several seconds, so the run is still under way when a page opens or the browser leaves.
LATENCY = "0.5"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for this module only: while Playwright's sync API is open, ``asyncio.run``
    (the other system tests' reference runs) cannot be called in this thread."""
    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def new_context(browser, cluster, request):
    """Fresh browser contexts for this test, closed at its end (before the cluster stops).

    On a failure: a screenshot of every open page and the cluster's process logs."""
    contexts = []
    remove_stale_failure_screenshots(request.node.name)

    def make():
        ctx = browser.new_context()
        ctx.set_default_timeout(15_000)
        ctx.add_init_script(LIVE_PROBE)
        contexts.append(ctx)
        return ctx

    yield make
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        screenshot_failed_pages(contexts, request.node.name)
        for name in sorted(cluster.processes):
            sys.stderr.write(f"\n--- {name} ---\n{cluster.log(name)}\n")
    for ctx in contexts:
        try:
            ctx.close()
        except Exception:  # noqa: BLE001 - a context the test closed itself
            pass


@pytest.fixture
def screenshot(request):
    return lambda page, name: save_screenshot(page, request.node.name, name)


def _slow_cluster(cluster) -> tuple[str, str]:
    """Servers A and B (no worker inside either) and workers 1 and 2, with a slow offline model."""
    cluster.env["CMBAGENT_OFFLINE_LATENCY"] = LATENCY
    a = cluster.start_server("server-a")
    b = cluster.start_server("server-b")
    cluster.start_worker("worker-1")
    cluster.start_worker("worker-2")
    return a, b


def _progress(cluster, session_id: str) -> tuple[int, str]:
    return cluster.sql("SELECT last_seq, status FROM agent_sessions_session WHERE id = %s", session_id)[0]


def _db_events(cluster, session_id: str) -> list[dict]:
    return [dict(seq=seq, kind=kind, agent=agent, content=content) for seq, kind, agent, content in cluster.events(session_id)]


def _open_session(page: Page, base_url: str, session_id: str) -> None:
    page.goto(f"{base_url}/sessions/{session_id}/")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    page.evaluate("window.__e2e_same_document = true")


def _watched_to_the_end(page: Page, db_events: list[dict]) -> dict:
    """The page, never reloaded, shows the database's transcript; returns its live probe."""
    expect(page.locator("#session-status")).to_have_attribute("data-status", "completed", timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#transcript article[data-seq]")).to_have_count(len(db_events), timeout=RUN_TIMEOUT_MS)
    assert page.evaluate("window.__e2e_same_document") is True, "the page was reloaded or navigated"
    assert_matches_db(dom_transcript(page), db_events)
    expect(page.locator('[data-testid="event-count"]')).to_have_text(str(len(db_events)))
    probe = page.evaluate("window.__e2e")
    n = len(db_events)
    # Live: what was not in the HTML arrived over the socket, each event exactly once.
    assert sorted(probe["initialSeqs"] + probe["addedSeqs"]) == list(range(1, n + 1)), probe
    assert probe["statuses"][-1] == "completed", probe["statuses"]
    return probe


def test_pages_on_two_servers_show_a_run_of_a_worker_live(cluster, new_context, screenshot):
    """A run started from server A's page runs on a worker process; pages on A and on B (opened mid-run)
    show it live, without a reload, and end equal to the database."""
    a, b = _slow_cluster(cluster)
    servers = {cluster.processes["server-a"].pid, cluster.processes["server-b"].pid}
    workers = {cluster.processes["worker-1"].pid, cluster.processes["worker-2"].pid}

    on_a = new_context().new_page()
    log_in(on_a, a, *ALICE)
    on_b = new_context().new_page()  # another browser, logged in through the other server
    log_in(on_b, b, *ALICE)

    session_id = start_session(on_a, a, "Estimate the CMB power spectrum peak positions.", "planning_and_control")
    on_a.evaluate("window.__e2e_same_document = true")
    assert on_a.evaluate("window.__e2e.initial") is not None, "the live probe did not see #transcript at load"

    # Watch the run from the database meanwhile: who holds it, and when it is well under way.
    owners: set[str] = set()
    opened_b_at = None
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while True:
        owners |= {owner for (owner,) in cluster.sql("SELECT lease_owner FROM agent_sessions_run WHERE session_id = %s", session_id) if owner}
        seq, status = _progress(cluster, session_id)
        if opened_b_at is None and seq >= 8 and status == "running":
            _open_session(on_b, b, session_id)
            opened_b_at = seq
            screenshot(on_b, "server-b-mid-run")
        if status == "completed":
            break
        assert status in ("queued", "running"), f"the run ended {status}"
        assert time.monotonic() < deadline, f"the run did not complete (at seq {seq}, {status})"
        time.sleep(0.05)
    assert opened_b_at is not None, "the run ended before the page on server B could be opened mid-run"

    # The run was held by worker processes only: never by a server.
    assert owners, "no lease owner was ever seen on the run"
    holders = {int(owner.split(":")[1]) for owner in owners}
    assert holders <= workers and not holders & servers, (owners, workers, servers)
    assert cluster.sql("SELECT status FROM agent_sessions_run WHERE session_id = %s", session_id) == [("completed",)]

    db_events = _db_events(cluster, session_id)
    assert db_events and db_events[-1]["kind"] == "status"
    probe_a = _watched_to_the_end(on_a, db_events)
    probe_b = _watched_to_the_end(on_b, db_events)
    screenshot(on_a, "server-a-completed")
    screenshot(on_b, "server-b-completed")
    n = len(db_events)
    assert probe_a["addedSeqs"] and probe_a["initial"] < n, "server A's page got nothing over the socket"
    assert probe_a["statuses"][0] != "completed"
    # B opened mid-run: part of the transcript was in its HTML, the rest came live through B.
    assert 0 < probe_b["initial"] < n and probe_b["addedSeqs"], probe_b
    assert probe_b["statuses"][0] == "running", probe_b["statuses"]
    assert rows(dom_transcript(on_a)) == rows(dom_transcript(on_b))
    assert {e["kind"] for e in db_events} >= {"task", "plan", "message", "tool_call", "tool_result", "artifact", "status"}


def test_closing_the_browser_mid_run_loses_nothing(cluster, new_context, screenshot):
    """Close the browser mid-run: the run goes on without it; back later through the other server,
    the page shows everything so far and follows the run live to its end."""
    a, b = _slow_cluster(cluster)

    first = new_context()
    page = first.new_page()
    log_in(page, a, *ALICE)
    session_id = start_session(page, a, "Fit a damped oscillation to the CMB acoustic peaks and plot it.", "planning_and_control")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#transcript article[data-seq]")).not_to_have_count(0)
    cluster.wait_until(lambda: _progress(cluster, session_id)[0] >= 6, 30, "the run to get under way")
    screenshot(page, "before-closing")
    shown = page.locator("#transcript article[data-seq]").count()
    assert shown >= 1
    first.close()  # the whole browser session: cookies, pages, sockets
    closed_at, status = _progress(cluster, session_id)
    assert status == "running", f"the run was {status} when the browser left"

    # The run goes on with no page open anywhere.
    cluster.wait_until(lambda: _progress(cluster, session_id)[0] >= closed_at + 4, 30, "events written while the browser was away")
    seq, status = _progress(cluster, session_id)
    assert status == "running", f"the run ended ({status}) before the browser came back: make LATENCY larger"
    written_meanwhile = cluster.sql(
        "SELECT count(*) FROM agent_sessions_event WHERE session_id = %s AND seq > %s", session_id, closed_at
    )[0][0]
    assert written_meanwhile >= 4

    # Back, through the other server, in a new browser session that must log in again.
    page = new_context().new_page()
    page.goto(f"{b}/sessions/{session_id}/")
    assert "/login/" in page.url, f"a new browser context was let in without logging in: {page.url}"
    log_in(page, b, *ALICE)
    _open_session(page, b, session_id)
    at_load = page.evaluate("window.__e2e")
    assert at_load["initial"] >= closed_at + 4, at_load  # everything written while away, in the HTML or just pushed
    screenshot(page, "back-mid-run")

    # The page came back while the run was going on: it shows the start and everything written
    # meanwhile, and gets the rest live.
    cluster.wait_until(lambda: _progress(cluster, session_id)[1] == "completed", RUN_TIMEOUT_MS / 1000, "the run to complete")
    db_events = _db_events(cluster, session_id)
    probe = _watched_to_the_end(page, db_events)
    assert probe["initial"] < len(db_events) and probe["addedSeqs"], f"nothing arrived live after coming back: {probe}"
    assert probe["statuses"][0] == "running", probe["statuses"]
    screenshot(page, "back-completed")
