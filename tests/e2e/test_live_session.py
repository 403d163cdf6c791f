"""The session page in a real browser against a real server: live transcript, access, escaping, form errors."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.browser_support import LIVE_PROBE, SESSION_URL, assert_matches_db, dom_transcript, rows, start_session

pytestmark = pytest.mark.browser

RUN_TIMEOUT_MS = 30_000  # a run takes well under a second here; generous for a loaded CI box
PLANNING_AGENTS = {"planner", "plan_reviewer", "control", "researcher", "engineer", "executor", "summarizer", "terminator"}
XSS_MARKUP = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
XSS_TASK = f"Check escaping: {XSS_MARKUP} end."

# Open a socket to ``path`` from the page, say hello, and resolve with how it
# went: on close, or (``untilMessage``) on the first message, or after 10 s.
SOCKET_JS = """
({path, untilMessage}) => new Promise((resolve) => {
  const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + path);
  const seen = {opened: false, messages: [], code: null, timedOut: false};
  const done = () => { clearTimeout(timer); resolve(seen); };
  const timer = setTimeout(() => { seen.timedOut = true; ws.close(); resolve(seen); }, 10000);
  ws.onopen = () => { seen.opened = true; ws.send(JSON.stringify({type: 'hello', after: 0})); };
  ws.onmessage = (e) => {
    seen.messages.push(String(e.data).slice(0, 5000));
    if (untilMessage) { ws.close(); done(); }
  };
  ws.onclose = (e) => { seen.code = e.code; done(); };
})
"""


def wait_until_done(page: Page, db_count: int | None = None) -> None:
    expect(page.locator("#session-status")).to_have_attribute("data-status", "completed", timeout=RUN_TIMEOUT_MS)
    if db_count is not None:
        expect(page.locator("#transcript article[data-seq]")).to_have_count(db_count, timeout=RUN_TIMEOUT_MS)


def test_planning_run_streams_live_and_survives_reload(
    e2e_server, live_server_url, context, login, accounts, screenshot
):
    """Messages arrive live without a reload; the transcript equals the database's, and a reload or a
    second tab shows exactly the same transcript."""
    context.add_init_script(LIVE_PROBE)
    page = context.new_page()
    login(page, accounts["alice"])
    screenshot(page, "session-list")
    page.goto(live_server_url + "/sessions/new/")
    expect(page.locator("select[name=mode] option[value=planning_and_control]")).to_have_count(1)
    screenshot(page, "new-session-form")

    session_id = start_session(page, live_server_url, "Estimate the CMB power spectrum peak positions.", "planning_and_control")
    # Mark this document: if anything navigated or reloaded it, the mark would be gone.
    page.evaluate("window.__e2e_same_document = true")
    initial = page.evaluate("window.__e2e.initial")
    assert initial is not None, "the live probe did not see #transcript at load"

    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    wait_until_done(page)
    db_events = e2e_server.db_events(session_id)
    assert db_events, "the database holds no events for the session"
    # The badge says completed only once the final status event exists; every event must show up.
    expect(page.locator("#transcript article[data-seq]")).to_have_count(len(db_events), timeout=RUN_TIMEOUT_MS)
    screenshot(page, "session-completed")

    assert page.evaluate("window.__e2e_same_document") is True, "the page was reloaded or navigated"
    probe = page.evaluate("window.__e2e")
    n = len(db_events)
    assert n == 38, f"a planning_and_control run with the offline model writes 38 events, the database has {n}"
    # Live: events were appended to this very document after it loaded, each exactly once.
    assert len(probe["addedSeqs"]) > 0, f"no event arrived over the socket (all {n} were in the initial HTML)"
    assert probe["initial"] < n
    assert sorted(probe["initialSeqs"] + probe["addedSeqs"]) == list(range(1, n + 1)), probe
    assert probe["statuses"][-1] == "completed" and probe["statuses"][0] != "completed", probe["statuses"]
    # The run at a glance changed live: the plan appeared, its steps went forward to all done, tokens grew.
    # (A run this fast can reach the page in a few batches; the bar ticking step by step is checked on a
    # run paced like a real model's, in test_session_console.)
    readings = probe["glance"]
    done = [r["done"] for r in readings if r["done"] is not None]
    assert done and done == sorted(done) and done[-1] == readings[-1]["steps"] >= 2, readings
    assert readings[0]["done"] is None or readings[0]["done"] < done[-1]
    tokens = [int(r["tokens"]) for r in readings]
    assert tokens == sorted(tokens) and tokens[-1] > tokens[0], tokens
    assert readings[-1]["cost"].startswith("$") and readings[-1]["phase"] != "—"
    expect(page.locator('#session-totals tr[data-agent="engineer"]')).to_have_count(1)  # usage per agent
    expect(page.locator("#session-totals li.step--done")).to_have_count(readings[-1]["steps"])

    before = dom_transcript(page)
    assert_matches_db(before, db_events)
    assert any(e["kind"] == "artifact" for e in before), "the engineer's code produced no files"
    expect(page.locator("#transcript .badge--failed")).to_have_count(0)
    agents = {e["agent"] for e in before if e["kind"] == "message"}
    assert PLANNING_AGENTS <= agents, f"missing messages from {sorted(PLANNING_AGENTS - agents)}"
    assert e2e_server.db_session(session_id)["status"] == "completed"
    expect(page.locator('[data-testid="event-count"]')).to_have_text(str(n))

    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#session-status")).to_have_attribute("data-status", "completed")
    after_reload = dom_transcript(page)
    assert rows(after_reload) == rows(before)

    second = context.new_page()
    second.goto(live_server_url + f"/sessions/{session_id}/")
    expect(second.locator("#connection")).to_have_attribute("data-state", "live")
    expect(second.locator("#session-status")).to_have_attribute("data-status", "completed")
    assert rows(dom_transcript(second)) == rows(before)
    # Nothing is pushed twice onto a page that already shows everything.
    assert second.evaluate("window.__e2e.addedSeqs") == []


def test_other_users_and_anonymous_are_refused(
    e2e_server, live_server_url, new_context, login, accounts
):
    """Another user's session looks missing (404) and its socket closes with 4403; without a login 4401."""
    alice = new_context().new_page()
    login(alice, accounts["alice"])
    session_id = start_session(alice, live_server_url, "A private task for alice only.", "one_shot")
    wait_until_done(alice)
    socket_path = f"/ws/sessions/{session_id}/"
    # Control: the owner's own socket opens and is sent the transcript.
    own = alice.evaluate(SOCKET_JS, {"path": socket_path, "untilMessage": True})
    assert own["opened"] and own["code"] is None and own["messages"], own
    assert any('data-seq="1"' in m for m in own["messages"]), own["messages"][:1]

    # The run's files: the owner can fetch them.
    file_urls = alice.eval_on_selector_all("#transcript .artifact a[href]", "links => links.map(a => a.getAttribute('href'))")
    assert file_urls, "the one_shot run showed no artifact links"
    for url in file_urls:
        assert alice.request.get(live_server_url + url).status == 200, url

    bob = new_context().new_page()
    login(bob, accounts["bob"])
    response = bob.goto(live_server_url + f"/sessions/{session_id}/")
    assert response is not None and response.status == 404
    assert "A private task for alice only" not in bob.content()
    for url in file_urls:
        assert bob.request.get(live_server_url + url).status == 404, f"bob can fetch alice's file {url}"
    refused = bob.evaluate(SOCKET_JS, {"path": socket_path, "untilMessage": False})
    assert refused["code"] == 4403, refused
    assert refused["messages"] == [], "the socket leaked data to another user"

    anonymous = new_context().new_page()
    response = anonymous.goto(live_server_url + f"/sessions/{session_id}/")
    assert response is not None and "/login/" in anonymous.url, anonymous.url
    refused = anonymous.evaluate(SOCKET_JS, {"path": socket_path, "untilMessage": False})
    assert refused["code"] == 4401, refused
    assert refused["messages"] == []


def test_task_markup_is_shown_as_text(e2e_server, live_server_url, context, login, accounts):
    """Markup in a task is shown as text, in the page and in messages pushed live, before and after a
    reload; no script from it ever runs."""
    context.add_init_script(LIVE_PROBE)
    page = context.new_page()
    login(page, accounts["alice"])
    session_id = start_session(page, live_server_url, XSS_TASK, "one_shot")
    wait_until_done(page)
    db_events = e2e_server.db_events(session_id)
    expect(page.locator("#transcript article[data-seq]")).to_have_count(len(db_events))
    assert_matches_db(dom_transcript(page), db_events)
    # Measured, not assumed: a one_shot run is shorter than planning_and_control's 38 events.
    assert 3 < len(db_events) < 38

    # The agents quote the task; the quoting messages (markup included) must be pushed live as text.
    quoting = [e["seq"] for e in db_events if e["kind"] == "message" and "<img src=x onerror=" in e["content"]]
    assert quoting, "no message quotes the task's markup: this test would not exercise the pushed path"
    pushed = page.evaluate("window.__e2e.addedSeqs")
    assert set(quoting) <= set(pushed), f"quoting events {quoting} were not pushed live (pushed: {pushed})"

    for state in ("live", "reloaded"):
        if state == "reloaded":
            page.reload()
            expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        # The whole task, markup and all, is on the page as visible text (the title holds only
        # its first 80 characters, so this is the task itself, wherever the page shows it).
        expect(page.locator("main")).to_contain_text(XSS_MARKUP)
        expect(page.locator("h1")).to_contain_text("<script>window.__xss=1</script>")
        for seq in quoting:
            expect(page.locator(f'#transcript article[data-seq="{seq}"]')).to_contain_text('<img src=x onerror="window')
        assert page.locator("main script").count() == 0, "task markup became a <script> element"
        assert page.locator('img[src="x"], [onerror]').count() == 0, "task markup became an <img onerror> element"
        assert page.evaluate("typeof window.__xss") == "undefined", f"script ran ({state})"

    page.goto(live_server_url + "/sessions/")
    expect(page.locator(f"#session-row-{session_id} a")).to_contain_text("<script>window.__xss=1</script>")
    assert page.locator('main script, img[src="x"], [onerror]').count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_bad_form_input_is_refused_and_creates_nothing(e2e_server, live_server_url, page, login, accounts):
    """An empty task and a 100 KB task are refused with a message; no session is created."""
    login(page, accounts["alice"])
    rows_before = page.locator("table.sessions tbody tr").count()
    db_before = e2e_server.db_session_count("alice")

    for task in ("", "   \n  "):
        page.goto(live_server_url + "/sessions/new/")
        page.fill("textarea[name=task]", task)
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            page.get_by_role("button", name="Start", exact=True).click()
        assert posted.value.status == 400
        expect(page.get_by_role("alert")).to_contain_text("Describe the task for the team.")
        assert page.url == live_server_url + "/sessions/new/"

    huge = "x" * 100_000
    page.goto(live_server_url + "/sessions/new/")
    page.fill("textarea[name=task]", huge)
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Start", exact=True).click()
    assert posted.value.status == 400
    expect(page.get_by_role("alert")).to_contain_text("The task is 100,000 characters long; the limit is 20,000.")
    assert page.url == live_server_url + "/sessions/new/"

    page.goto(live_server_url + "/sessions/")
    assert page.locator("table.sessions tbody tr").count() == rows_before
    assert e2e_server.db_session_count("alice") == db_before


def test_round_budget_pauses_and_continue_finishes_without_reload(e2e_server, live_server_url, context, login, accounts, screenshot):
    """With a round budget the run pauses; each Continue press goes on live, and the end equals the database."""
    page = context.new_page()
    login(page, accounts["alice"])
    page.goto(live_server_url + "/sessions/new/")
    page.fill("textarea[name=task]", "Plot a damped cosine")
    page.select_option("select[name=mode]", "planning_and_control")
    page.fill("input[name=max_rounds]", "5")
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_url(SESSION_URL)
    session_id = SESSION_URL.search(page.url).group(1)
    page.evaluate("window.__e2e_same_document = true")

    status = page.locator("#session-status")
    expect(status).to_have_attribute("data-status", "paused", timeout=RUN_TIMEOUT_MS)
    screenshot(page, "session-paused")
    presses = 0
    while status.get_attribute("data-status") == "paused":
        count = page.locator("#transcript article[data-seq]").count()
        page.get_by_role("button", name="Continue").click()
        presses += 1
        assert presses < 10, "the run never finished"
        # The next pause or the end arrives live, after more events.
        expect(page.locator("#transcript article[data-seq]")).not_to_have_count(count, timeout=RUN_TIMEOUT_MS)
        expect(status).to_have_attribute("data-status", re.compile("paused|completed"), timeout=RUN_TIMEOUT_MS)
    assert presses >= 2
    wait_until_done(page)
    db_events = e2e_server.db_events(session_id)
    expect(page.locator("#transcript article[data-seq]")).to_have_count(len(db_events), timeout=RUN_TIMEOUT_MS)
    assert page.evaluate("window.__e2e_same_document") is True, "the page was reloaded or navigated"
    assert_matches_db(dom_transcript(page), db_events)
    assert sum(1 for e in db_events if e["kind"] == "status" and "max_rounds_reached" in e["content"]) == presses
