"""The session page as a console: socket drops, lifecycle controls, screenshots, and the CSP.

Every test here runs against a server of this module's own whose offline model
takes ``LATENCY`` seconds per reply, so a planning_and_control run lasts long
enough to be dropped, suspended or cancelled while it is under way. Every page
visited is watched for Content Security Policy violations.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import re
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, WebSocketRoute, expect

from tests.browser_support import CONNECTION_PROBE, LIVE_PROBE, assert_matches_db, dom_transcript, start_session
from tests.e2e.conftest import serve

pytestmark = pytest.mark.browser

# Seconds per reply of the offline model: a planning_and_control run takes several seconds.
LATENCY = "0.6"
RUN_TIMEOUT_MS = 90_000  # a slow run on a busy 2-core box
TASK = "Estimate the CMB power spectrum peak positions."
MIN_DROPS = 10
PHONE = {"width": 390, "height": 844}

# Chromium logs its own "... violates the following Content Security Policy directive ..." line; this
# says each violation on the console as well, with the directive and the script that caused it.
CSP_PROBE = """
document.addEventListener('securitypolicyviolation', (e) => {
  console.error('[e2e] Content Security Policy violation: ' + e.effectiveDirective + ' blocked '
    + (e.blockedURI || 'inline') + ' in ' + e.sourceFile + ':' + e.lineNumber + ' sample=' + JSON.stringify(e.sample));
}, true);
"""


# --- this module's server ------------------------------------------------------


@pytest.fixture(scope="module")
def _reference_future(tmp_path_factory):
    """The reference run, started at once in a thread of its own (while Playwright's sync API is open, this
    thread has a running event loop) so that it runs while the server starts."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(_reference_run, tmp_path_factory.mktemp("reference"), TASK)


@pytest.fixture(scope="module")
def e2e_server(_reference_future):
    """Like the tier's server, with a slow offline model (this module's tests use it through ``live_server_url``)."""
    with serve({"CMBAGENT_OFFLINE_LATENCY": LATENCY}, label="e2eslow") as server:
        yield server


@pytest.fixture(scope="module")
def live_server_url(e2e_server) -> str:
    return e2e_server.url


def _reference_run(work_dir: Path, task: str) -> list[tuple]:
    """The team's events for ``task`` in planning_and_control, run once in this process, never interrupted."""
    from orchestrator.engine import SwarmOrchestrator

    async def collect():
        engine = SwarmOrchestrator(task=task, mode="planning_and_control", work_dir=work_dir)
        return [(str(e.kind), e.agent, e.content) async for e, _ in engine.run([]) if e.kind != "status"]

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def reference(_reference_future) -> list[tuple]:
    return _reference_future.result(timeout=120)


def snapshots(e2e_server, session_ids: list[str], *, break_state: bool = False) -> dict[str, dict]:
    """Each session's status and events, read in one ``manage.py shell`` (each costs seconds on a busy box);
    with ``break_state``, first make their saved engine_state something the engine never writes."""
    return e2e_server.shell_json(
        "from sessions.models import Event, Session, SessionState\n"
        f"ids = {list(session_ids)!r}\n"
        + ("assert SessionState.objects.filter(session_id__in=ids).update(engine_state='not the engine state') == len(ids)\n" if break_state else "")
        + "emit({i: {'status': Session.objects.get(pk=i).status, 'events': list(Event.objects.filter(session_id=i)"
        ".order_by('seq').values('seq', 'kind', 'agent', 'content'))} for i in ids})\n"
    )


def snapshot(e2e_server, session_id: str, *, break_state: bool = False) -> dict:
    return snapshots(e2e_server, [session_id], break_state=break_state)[session_id]


def team_events(db_events: list[dict]) -> list[tuple]:
    """The team's conversation as the database holds it: everything but status notes."""
    return [(e["kind"], e["agent"], e["content"]) for e in db_events if e["kind"] != "status"]


# --- browser contexts watched for CSP violations -----------------------------


class Watched:
    """Makes browser contexts whose pages report CSP violations and uncaught errors into lists."""

    def __init__(self, new_context) -> None:
        self._new_context = new_context
        self.csp: list[str] = []
        self.errors: list[str] = []
        self.contexts: list[BrowserContext] = []

    def context(self, **kwargs) -> BrowserContext:
        ctx = self._new_context(**kwargs)
        ctx.add_init_script(CSP_PROBE)
        ctx.on("console", self._console)
        ctx.on("weberror", lambda err: self.errors.append(f"{err.page.url if err.page else '?'}: {err.error}"))
        self.contexts.append(ctx)
        return ctx

    def _console(self, msg) -> None:
        if "content security policy" in msg.text.lower():
            where = msg.page.url if msg.page else "?"
            self.csp.append(f"{where}: [{msg.type}] {msg.text}")

    def assert_clean(self) -> None:
        assert not self.csp, "Content Security Policy violations:\n" + "\n".join(dict.fromkeys(self.csp))
        assert not self.errors, "uncaught errors in pages:\n" + "\n".join(self.errors)


@pytest.fixture
def watched(new_context) -> Watched:
    return Watched(new_context)


# --- helpers -------------------------------------------------------------------


def status_of(page: Page):
    return page.locator("#session-status")


def action(page: Page, name: str):
    return page.locator(f'#session-status-box button[data-action="{name}"]')


def wait_running(page: Page, min_events: int = 3) -> None:
    """The run is under way: a worker took it and the team has written a few events."""
    expect(status_of(page)).to_have_attribute("data-status", "running", timeout=RUN_TIMEOUT_MS)
    page.wait_for_function(
        "n => document.querySelectorAll('#transcript > [data-seq]').length >= n", arg=min_events, timeout=RUN_TIMEOUT_MS
    )


def settle(page: Page, db: dict) -> list[dict]:
    """Once the page shows as many events as the database snapshot ``db``: asserts it shows exactly those."""
    db_events = db["events"]
    expect(page.locator("#transcript > article[data-seq]")).to_have_count(len(db_events), timeout=RUN_TIMEOUT_MS)
    assert_matches_db(dom_transcript(page), db_events)
    return db_events


# --- 1. socket drops -------------------------------------------------------------


def test_socket_dropped_ten_times_mid_run_loses_and_repeats_nothing(
    e2e_server, live_server_url, watched, login, accounts, reference
):
    """Each socket the page opens is cut (as an abnormal close, 1006) right after the server's first message
    on it: the page shows "reconnecting", reconnects, says which seq it has (in each socket's URL, afresh), and
    ends with exactly the database's transcript — every seq once, in order — with the team's events those of an
    uninterrupted run."""
    context = watched.context()
    context.add_init_script(LIVE_PROBE)
    context.add_init_script(CONNECTION_PROBE)
    page = context.new_page()

    drops: list[str] = []
    sockets: list[str] = []

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        sockets.append(ws.url)
        cut = [False]

        def from_server(message) -> None:
            if cut[0]:
                return  # the server's socket is closing: anything after the cut is the next socket's business
            ws.send(message)
            cut[0] = True
            drops.append(ws.url)
            server.close()  # the server sees its socket go away
            ws.close(code=1006, reason="dropped by the e2e test")  # the page sees an abnormal closure

        def server_closed(code, reason) -> None:
            if not cut[0]:
                ws.close(code=code, reason=reason)

        server.on_message(from_server)
        server.on_close(server_closed)
        ws.on_close(lambda code, reason: server.close())

    page.route_web_socket(re.compile(r"/ws/sessions/[0-9a-f-]{36}/\?after=\d+$"), route)
    login(page, accounts["alice"])
    session_id = start_session(page, live_server_url, TASK, "planning_and_control")
    page.evaluate("window.__e2e_same_document = true")

    expect(status_of(page)).to_have_attribute("data-status", "completed", timeout=RUN_TIMEOUT_MS)
    db = snapshot(e2e_server, session_id)
    assert db["status"] == "completed"
    db_events = settle(page, db)
    # The last drop is followed by a reconnect that finds nothing new: the page ends live.
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=RUN_TIMEOUT_MS)

    assert page.evaluate("window.__e2e_same_document") is True, "the page was reloaded or navigated"
    assert len(drops) >= MIN_DROPS, f"only {len(drops)} drops during the run ({len(sockets)} sockets): make LATENCY larger"
    afters = [re.search(rf"/ws/sessions/{session_id}/\?after=(\d+)$", url) for url in sockets]
    assert all(afters), sockets
    # Each reconnect's URL says what the page shows by then: more and more as the run goes on.
    afters = [int(m.group(1)) for m in afters]
    assert afters == sorted(afters) and afters[-1] > afters[0], afters
    states = page.evaluate("window.__connection")
    assert states.count("reconnecting") >= MIN_DROPS, states
    probe = page.evaluate("window.__e2e")
    n = len(db_events)
    # Every event reached the page exactly once: in the first HTML or over one of the sockets, never twice.
    assert sorted(probe["initialSeqs"] + probe["addedSeqs"]) == list(range(1, n + 1)), probe
    assert len(probe["addedSeqs"]) > MIN_DROPS, probe
    assert team_events(db_events) == reference
    watched.assert_clean()


# --- 2. lifecycle from the page -----------------------------------------------------


def test_suspend_then_resume_from_the_page_completes_the_run(
    e2e_server, live_server_url, watched, login, accounts, reference
):
    """Suspend on a running session shows suspended (with Resume offered); Resume goes on to completed,
    live, and the transcript equals the database's, with the team's events those of an uninterrupted run."""
    context = watched.context()
    context.add_init_script(LIVE_PROBE)
    page = context.new_page()
    login(page, accounts["alice"])
    session_id = start_session(page, live_server_url, TASK, "planning_and_control")
    page.evaluate("window.__e2e_same_document = true")

    wait_running(page)
    action(page, "suspend").click()
    expect(status_of(page)).to_have_attribute("data-status", "suspended", timeout=RUN_TIMEOUT_MS)
    expect(action(page, "resume")).to_be_visible()
    expect(action(page, "suspend")).to_have_count(0)
    db = snapshot(e2e_server, session_id)
    assert db["status"] == "suspended"
    suspended = settle(page, db)
    assert len(team_events(suspended)) < len(reference), "the run finished before it was suspended"

    action(page, "resume").click()
    expect(status_of(page)).to_have_attribute("data-status", "completed", timeout=RUN_TIMEOUT_MS)
    db = snapshot(e2e_server, session_id)
    assert db["status"] == "completed"
    db_events = settle(page, db)
    assert page.evaluate("window.__e2e_same_document") is True, "the page was reloaded or navigated"
    probe = page.evaluate("window.__e2e")
    assert sorted(probe["initialSeqs"] + probe["addedSeqs"]) == list(range(1, len(db_events) + 1)), probe
    assert "suspended" in probe["statuses"], probe["statuses"]
    assert team_events(db_events) == reference, "the resumed run repeated or lost part of the conversation"
    statuses = [e["content"] for e in db_events if e["kind"] == "status"]
    assert any("Resuming from the saved state" in s for s in statuses), statuses
    watched.assert_clean()


def test_cancel_from_the_page_after_confirming(e2e_server, live_server_url, watched, login, accounts):
    """Cancel asks for confirmation; accepted, the running session shows cancelled within a few seconds
    and offers no controls any more."""
    context = watched.context()
    page = context.new_page()
    login(page, accounts["alice"])
    session_id = start_session(page, live_server_url, TASK, "planning_and_control")
    wait_running(page)

    dialogs: list[str] = []

    def accept(dialog) -> None:
        dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.accept()

    page.on("dialog", accept)
    action(page, "cancel").click()
    expect(status_of(page)).to_have_attribute("data-status", "cancelled", timeout=10_000)
    assert dialogs == ["confirm: Cancel this session? It cannot be continued afterwards."], dialogs
    expect(page.locator("#session-status-box button[data-action]")).to_have_count(0)
    db = snapshot(e2e_server, session_id)
    assert db["status"] == "cancelled"
    db_events = settle(page, db)
    assert db_events[-1]["kind"] == "status", db_events[-1]
    watched.assert_clean()


def test_resume_refused_shows_why_and_writes_nothing(e2e_server, live_server_url, watched, login, accounts):
    """A suspended session whose saved state is broken: Resume shows the cause in #action-errors,
    the session stays suspended and not one event is written."""
    context = watched.context()
    page = context.new_page()
    login(page, accounts["alice"])
    session_id = start_session(page, live_server_url, TASK, "planning_and_control")
    wait_running(page)
    action(page, "suspend").click()
    expect(status_of(page)).to_have_attribute("data-status", "suspended", timeout=RUN_TIMEOUT_MS)
    # Break the saved state the way a bad migration or a hand edit would: engine_state is no longer a dict.
    db = snapshot(e2e_server, session_id, break_state=True)
    assert db["status"] == "suspended"
    before = settle(page, db)

    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/resume/")) as posted:
        action(page, "resume").click()
    assert posted.value.status == 200
    expect(page.locator("#action-errors")).to_contain_text(
        "The saved state of this session is unreadable (it is not the shape the engine writes)."
    )
    expect(status_of(page)).to_have_attribute("data-status", "suspended")
    expect(action(page, "resume")).to_be_visible()
    db = snapshot(e2e_server, session_id)
    assert db["status"] == "suspended"
    after = db["events"]
    assert after == before, f"a refused resume wrote {len(after) - len(before)} events"
    assert_matches_db(dom_transcript(page), after)
    # The refusal stays until the next control: accepted (204, nothing swapped in), it clears it.
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/cancel/")) as posted:
        action(page, "cancel").click()
    assert posted.value.status == 204
    expect(page.locator("#action-errors")).to_be_empty()
    expect(status_of(page)).to_have_attribute("data-status", "cancelled", timeout=RUN_TIMEOUT_MS)
    watched.assert_clean()


# --- 3 and 4. screenshots of the main pages; the CSP on every one of them --------------------------


def test_main_pages_in_light_dark_and_phone_keep_to_the_csp(
    e2e_server, live_server_url, watched, login, accounts, screenshot
):
    """Screenshots of the login page, session list, new session form, a session mid-run and completed, the
    approval queue, the admin index and its approval requests, in light, dark and on a phone; every page
    sends the CSP header and none of them (nor the live socket's pushes) violates it."""
    carol = accounts["carol"]
    looks = {
        "light": watched.context(color_scheme="light", viewport={"width": 1280, "height": 900}),
        "dark": watched.context(color_scheme="dark", viewport={"width": 1280, "height": 900}),
        "phone": watched.context(color_scheme="light", viewport=PHONE, is_mobile=True, has_touch=True),
    }
    looks["light"].add_init_script(LIVE_PROBE)
    pages = {look: ctx.new_page() for look, ctx in looks.items()}
    headers: dict[str, str] = {}

    def visit(look: str, path: str) -> None:
        response = pages[look].goto(live_server_url + path)
        assert response is not None and response.status == 200, (path, response and response.status)
        headers[f"{look} {path}"] = response.headers.get("content-security-policy", "")

    for look, page in pages.items():
        visit(look, "/login/")
        screenshot(page, f"{look}-login")
        login(page, carol)

    # A session waiting for a person (for the queue); then for each look a run of its own, shot while
    # the team is at work (one run shared by three looks could end before the third shot on a busy box).
    waiting_id = start_session(pages["light"], live_server_url, "Plot a damped cosine and check the plan.", "hitl_plan")
    running: dict[str, str] = {}
    for look, page in pages.items():
        running[look] = start_session(page, live_server_url, TASK, "planning_and_control")
        visit(look, f"/sessions/{running[look]}/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=RUN_TIMEOUT_MS)
        wait_running(page)
        screenshot(page, f"{look}-session-running")
        assert status_of(page).get_attribute("data-status") != "completed", "the run ended before its mid-run screenshot"
    for page in pages.values():
        expect(status_of(page)).to_have_attribute("data-status", "completed", timeout=RUN_TIMEOUT_MS)
    db = snapshots(e2e_server, list(running.values()))
    for look, page in pages.items():
        assert db[running[look]]["status"] == "completed"
        settle(page, db[running[look]])
        screenshot(page, f"{look}-session-completed")
    # On a run paced like a real model's, the run at a glance ticks live, one plan step after another.
    readings = pages["light"].evaluate("window.__e2e.glance")
    done = [r["done"] for r in readings if r["done"] is not None]
    assert done and done == sorted(done) and done[-1] == readings[-1]["steps"] >= 2, readings
    assert len(set(done)) >= 2, f"the progress bar did not move live: {done}"

    for look, page in pages.items():
        visit(look, "/sessions/")
        for session_id in running.values():
            expect(page.locator(f"#session-row-{session_id}")).to_be_visible()
        screenshot(page, f"{look}-session-list")
        visit(look, "/sessions/new/")
        screenshot(page, f"{look}-new-session")
        visit(look, "/approvals/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=RUN_TIMEOUT_MS)
        # The plan of the hitl_plan session waits for a person: the queue shows its card.
        expect(page.locator(f'.approval-card a[href="/sessions/{waiting_id}/"]')).to_be_visible(timeout=RUN_TIMEOUT_MS)
        screenshot(page, f"{look}-approval-queue")
        visit(look, "/admin/")
        screenshot(page, f"{look}-admin-index")
        visit(look, "/admin/approvals/approvalrequest/")
        expect(page.locator("#result_list")).to_contain_text("Plot a damped cosine")
        screenshot(page, f"{look}-admin-approval-requests")

    assert set(headers) >= {f"{look} /sessions/{running[look]}/" for look in pages}
    for visited, header in headers.items():
        assert "script-src 'self'" in header and "default-src 'none'" in header, f"{visited}: CSP header {header!r}"
    watched.assert_clean()

    # The watch itself works: an inline script on one of these pages is refused, and reported.
    light = pages["light"]
    with light.expect_console_message(lambda m: "Content Security Policy" in m.text, timeout=10_000):
        light.evaluate("() => { const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; document.body.append(s); }")
    assert light.evaluate("typeof window.__inline") == "undefined", "an inline script ran: the CSP is not enforced"
    assert any("script-src" in message for message in watched.csp), watched.csp


def test_a_long_unbroken_task_wraps_in_the_task_box_on_a_phone(live_server_url, watched, login, accounts):
    """A task pasted as one long token (a path, a URL, a hash) wraps inside its box instead of pushing the box,
    or the page, sideways on a narrow screen."""
    page = watched.context(color_scheme="light", viewport=PHONE, is_mobile=True, has_touch=True).new_page()
    login(page, accounts["alice"])
    token = "https://example.org/data/" + "planck_2018_TT_spectrum_binned_" * 20 + "v3.fits"
    start_session(page, live_server_url, token, "one_shot")
    box = page.locator(".task-card .prose")
    expect(box).to_contain_text("planck_2018_TT_spectrum_binned_")
    widths = box.evaluate("el => ({scroll: el.scrollWidth, client: el.clientWidth})")
    assert widths["scroll"] <= widths["client"] + 1, widths
    page_width = page.evaluate("() => document.documentElement.scrollWidth")
    assert page_width <= PHONE["width"], page_width
