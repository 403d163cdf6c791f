"""Approvals across browsers, live: staff decide in the approval queue while the owner's session page follows.

Every page here is loaded once; whatever changes on it arrives over its socket
(each page is marked, and the mark must survive to the end).
"""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_support import LIVE_PROBE, assert_matches_db, dom_transcript, start_session

pytestmark = pytest.mark.browser

RUN_TIMEOUT_MS = 30_000  # a run takes well under a second here; generous for a loaded CI box
LIVE_TIMEOUT_MS = 15_000  # a push over a socket: milliseconds normally
FEEDBACK = "Approved from the staff queue: keep the plot axes labelled."


def mark_document(page: Page) -> None:
    """Mark the document: a reload or navigation would drop the mark."""
    page.evaluate("window.__e2e_same_document = true")


def assert_same_document(page: Page, what: str) -> None:
    assert page.evaluate("window.__e2e_same_document") is True, f"the {what} was reloaded or navigated"


def open_queue(page: Page, base_url: str) -> None:
    """Open the staff approval queue and wait until its socket is live (it then hears every new request)."""
    response = page.goto(base_url + "/approvals/")
    assert response is not None and response.status == 200
    expect(page.get_by_role("heading", name="Approval queue")).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=LIVE_TIMEOUT_MS)
    mark_document(page)


def queue_card_of(page: Page, session_id: str):
    """The queue's card(s) for a request of this session (each names its session with a link)."""
    return page.locator(f'#approval-rows article.approval-card:has(a[href="/sessions/{session_id}/"])')


def test_staff_approves_in_the_queue_while_the_owner_page_follows_live(
    e2e_server, live_server_url, new_context, login, accounts, screenshot
):
    """Carol (staff) has the queue open before alice starts a hitl_plan session. The plan request appears
    in the queue live; carol approves it there with feedback. Without a reload the request leaves her
    queue, and on alice's page the card leaves, the decision (approve, by carol, with the feedback) is
    shown, the run goes on to completed, and the transcript equals the database's. The request is
    recorded as decided by carol through the staff queue."""
    staff = new_context().new_page()
    login(staff, accounts["carol"])
    expect(staff.locator("header.topbar nav a", has_text="Approvals")).to_have_count(1)
    open_queue(staff, live_server_url)

    owner_context = new_context()
    owner_context.add_init_script(LIVE_PROBE)
    owner = owner_context.new_page()
    login(owner, accounts["alice"])
    # alice has no approvals permission: no queue link for her
    expect(owner.locator("header.topbar nav a", has_text="Approvals")).to_have_count(0)
    session_id = start_session(owner, live_server_url, "Plot a damped cosine and label the axes.", "hitl_plan")
    mark_document(owner)
    expect(owner.locator("#connection")).to_have_attribute("data-state", "live", timeout=LIVE_TIMEOUT_MS)

    # The run stops at the plan: the owner's page shows the plan's card.
    status = owner.locator("#session-status")
    expect(status).to_have_attribute("data-status", "waiting_approval", timeout=RUN_TIMEOUT_MS)
    owner_card = owner.locator("#approval-cards article.approval-card")
    expect(owner_card).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    expect(owner_card).to_have_attribute("data-kind", "plan")
    expect(owner_card.get_by_role("button", name="Approve", exact=True)).to_be_visible()
    card_id = owner_card.get_attribute("id")
    assert card_id and card_id.startswith("approval-"), card_id
    approval_seq = owner.locator('#transcript article[data-kind="approval"]').last.get_attribute("data-seq")

    # ... and the same request appeared in carol's queue, which was open since before the session existed.
    queue_card = queue_card_of(staff, session_id)
    expect(queue_card).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    expect(queue_card).to_have_attribute("id", card_id)
    expect(queue_card).to_have_attribute("data-kind", "plan")
    expect(queue_card.locator('input[name="door"]')).to_have_value("staff_queue")
    expect(queue_card.locator("ol.plan li").first).to_be_visible()
    assert_same_document(staff, "staff queue")
    screenshot(staff, "queue-with-request")
    screenshot(owner, "owner-with-card")

    [pending] = e2e_server.db_approval_requests(session_id)
    assert (pending["kind"], pending["status"], pending["decided_by__username"]) == ("plan", "pending", None), pending
    assert f"approval-{pending['id']}" == card_id
    assert str(pending["event_seq"]) == approval_seq, (pending, approval_seq)

    statuses_before = owner.evaluate("window.__e2e.statuses.length")
    seqs_before = owner.locator("#transcript article[data-seq]").count()

    queue_card.locator('textarea[name="feedback"]').fill(FEEDBACK)
    with staff.expect_response(lambda r: r.request.method == "POST" and "/approvals/" in r.url) as posted:
        queue_card.get_by_role("button", name="Approve", exact=True).click()
    assert posted.value.status == 204, (posted.value.status, posted.value.text())  # the card leaves through the sockets

    # Carol's queue: the request leaves, live.
    expect(queue_card_of(staff, session_id)).to_have_count(0, timeout=LIVE_TIMEOUT_MS)
    expect(staff.locator(f"#{card_id}")).to_have_count(0)
    expect(staff.locator(f"#{card_id}-errors")).to_have_count(0)  # no refusal was swapped in
    assert_same_document(staff, "staff queue")

    # Alice's page: the card leaves, the decision shows who decided and what they said, the run goes on.
    expect(owner.locator(f"#{card_id}")).to_have_count(0, timeout=LIVE_TIMEOUT_MS)
    expect(owner.locator("#approval-cards article.approval-card")).to_have_count(0)
    decision = owner.locator('#transcript article[data-kind="decision"]')
    expect(decision).to_have_count(1, timeout=RUN_TIMEOUT_MS)
    expect(decision.locator(".badge--decision")).to_have_text("approve")
    expect(decision).to_contain_text("by carol on the plan request")
    expect(decision.locator("blockquote")).to_have_text(FEEDBACK)
    expect(owner.locator('#transcript article[data-kind="status"]', has_text="Approve (carol): the team goes on.")).to_have_count(1)
    screenshot(owner, "owner-after-decision")

    expect(status).to_have_attribute("data-status", "completed", timeout=RUN_TIMEOUT_MS)
    db_events = e2e_server.db_events(session_id)
    expect(owner.locator("#transcript article[data-seq]")).to_have_count(len(db_events), timeout=RUN_TIMEOUT_MS)
    screenshot(owner, "owner-completed")
    assert_same_document(owner, "owner's session page")
    assert_matches_db(dom_transcript(owner), db_events)

    # Everything after the decision reached alice's page over the socket, each event once.
    probe = owner.evaluate("window.__e2e")
    n = len(db_events)
    assert n > seqs_before
    assert sorted(probe["initialSeqs"] + probe["addedSeqs"]) == list(range(1, n + 1)), probe
    assert set(range(seqs_before + 1, n + 1)) <= set(probe["addedSeqs"]), probe
    # The plan request itself came live too (the page was loaded while the team was still planning).
    assert int(approval_seq) in probe["addedSeqs"], f"the approval event {approval_seq} was in the initial HTML: {probe['initialSeqs']}"
    # The status went on from waiting_approval (never back to it) and ended completed.
    after = probe["statuses"][statuses_before:]
    assert probe["statuses"][statuses_before - 1] == "waiting_approval", probe["statuses"]
    assert after and after[-1] == "completed", probe["statuses"]
    going_on = [s for s in after if s != "waiting_approval"]
    assert "waiting_approval" not in after[after.index(going_on[0]):], after
    # The page showed the run going on (queued, then running) before it showed it completed.
    assert going_on[0] in ("queued", "running") and "running" in going_on[: going_on.index("completed")], after
    # The database: the decision event is carol's approve with her feedback; a run was queued, ran and completed.
    [decision_row] = [e for e in db_events if e["kind"] == "decision"]
    assert decision_row["agent"] == "human" and decision_row["seq"] > int(approval_seq), decision_row
    assert "approved" in decision_row["content"] and FEEDBACK in decision_row["content"], decision_row
    decided_at = decision_row["seq"]
    assert all(e["kind"] != "approval" for e in db_events if e["seq"] > decided_at), "the run asked again"
    states = [state for seq, state in _status_values(e2e_server, session_id) if seq > int(approval_seq)]
    assert states == ["waiting_approval", "queued", "running", "completed"], states
    assert e2e_server.db_session(session_id)["status"] == "completed"

    [decided] = e2e_server.db_approval_requests(session_id)
    assert decided["id"] == pending["id"]
    assert (decided["status"], decided["decision"], decided["decided_by__username"], decided["door"]) == (
        "decided",
        "approve",
        "carol",
        "staff_queue",
    ), decided
    assert decided["feedback"] == FEEDBACK


def _status_values(e2e_server, session_id: str) -> list[tuple[int, str]]:
    """(seq, data.status) of the session's status events, in seq order."""
    return [
        (row[0], row[1])
        for row in e2e_server.shell_json(
            "from sessions.models import Event\n"
            f"emit([(e.seq, (e.data or {{}}).get('status', '')) for e in Event.objects.filter(session_id={session_id!r}, kind='status').order_by('seq')])\n"
        )
    ]


def test_two_staff_queues_follow_a_request_live(e2e_server, live_server_url, new_context, login, accounts, screenshot):
    """Carol and dave both have the queue open: alice's new plan request appears in both without a
    reload, and when carol approves it, it leaves dave's queue live too."""
    queues = {}
    for name in ("carol", "dave"):
        page = new_context().new_page()
        login(page, accounts[name])
        open_queue(page, live_server_url)
        queues[name] = page

    owner = new_context().new_page()
    login(owner, accounts["alice"])
    session_id = start_session(owner, live_server_url, "Fit a straight line to noisy points.", "hitl_plan")

    for name, page in queues.items():
        expect(queue_card_of(page, session_id), f"the request in {name}'s queue").to_have_count(1, timeout=RUN_TIMEOUT_MS)
    card_id = queue_card_of(queues["carol"], session_id).get_attribute("id")
    expect(queue_card_of(queues["dave"], session_id)).to_have_attribute("id", card_id)
    screenshot(queues["dave"], "dave-queue-with-request")
    # Decide only once the session waits: the request reaches the queues when its approval event is
    # written, a moment before the run has ended and the session says waiting_approval; a decision in
    # that moment is refused ("This session is not waiting for an answer; it is running.").
    expect(owner.locator("#session-status")).to_have_attribute("data-status", "waiting_approval", timeout=RUN_TIMEOUT_MS)

    with queues["carol"].expect_response(lambda r: r.request.method == "POST" and "/approvals/" in r.url) as posted:
        queue_card_of(queues["carol"], session_id).get_by_role("button", name="Approve", exact=True).click()
    assert posted.value.status == 204, (posted.value.status, posted.value.text())
    for name, page in queues.items():
        expect(page.locator(f"#{card_id}"), f"the request left {name}'s queue").to_have_count(0, timeout=LIVE_TIMEOUT_MS)
        assert_same_document(page, f"{name}'s queue")
    screenshot(queues["dave"], "dave-queue-after-carol-decided")

    [decided] = e2e_server.db_approval_requests(session_id)
    assert f"approval-{decided['id']}" == card_id
    assert (decided["status"], decided["decision"], decided["decided_by__username"], decided["door"]) == (
        "decided",
        "approve",
        "carol",
        "staff_queue",
    ), decided
    # Let the run the decision queued finish, so nothing of this test is still running after it.
    expect(owner.locator("#session-status")).to_have_attribute("data-status", "completed", timeout=RUN_TIMEOUT_MS)
