"""The session page of a long session: it opens at its newest window of events and loads older ones as you scroll up.

One session of ``TOTAL`` events is written straight into the e2e server's database (through
``manage.py shell``, as the tier reads its truth) and never run: it is suspended in the very
transaction that starts it, so the embedded worker has no queued run to take. The page must open at
its newest ``TRANSCRIPT_WINDOW`` events scrolled to the bottom of ``#transcript``, load the window
before as the reader reaches the top (the ``#older-events`` loader's ``intersect`` trigger, or the
button itself from the keyboard) without moving what the reader was looking at, end with every event
exactly once, and still follow new events at the bottom.
"""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_support import assert_matches_db, dom_transcript

pytestmark = pytest.mark.browser

WINDOW = 200  # settings.TRANSCRIPT_WINDOW's default; the e2e server does not set it
TOTAL = 650  # events in the session: windows 451..650, 251..450, 51..250, 1..50
PLACE_TOLERANCE_PX = 4  # how far the article the reader was looking at may move when older events go in above it
BOTTOM_TOLERANCE_PX = 4
SETTLE_MS = 800  # how long to watch for a second, unasked-for load after one (a cascade)
AGENTS = ("planner", "engineer", "researcher")

# Seq 1 is the session's "queued" status, 2..TOTAL-1 are messages (every seventh a tall one, so the
# articles differ in height), TOTAL is the "suspended" status written by session_suspend.
SEED = f"""
from django.contrib.auth import get_user_model
from django.db import transaction
from sessions import services
from sessions.models import Event, Run, Session

alice = get_user_model().objects.get(username='alice')
AGENTS = {AGENTS!r}

def content(n):
    text = f'Window message {{n:04d}}: the **{{n}}th** reply of the long session.'
    if n % 7 == 0:
        text += ''.join(f'\\n\\nParagraph {{p}} of message {{n:04d}}, long enough to wrap across the transcript at a desktop width.' for p in range(1, 4))
    return text

# One transaction: the embedded worker is woken only after it commits, and by then the run is suspended.
with transaction.atomic():
    session = services.session_start(owner=alice, task='A long session: {TOTAL} events, read a window at a time.', mode='one_shot')
    Event.objects.bulk_create([
        Event(session=session, seq=n, kind='message', agent=AGENTS[n % 3], content=content(n), data={{'role': 'assistant'}})
        for n in range(2, {TOTAL})
    ])
    Session.objects.filter(pk=session.pk).update(last_seq={TOTAL} - 1)
    services.session_suspend(session_id=session.pk, user=alice)
session.refresh_from_db()
emit({{'id': str(session.pk), 'status': session.status, 'last_seq': session.last_seq,
      'runs': list(Run.objects.filter(session=session).values_list('status', flat=True))}})
"""

APPEND = """
from orchestrator.engine.events import EngineEvent, EventKind
from sessions import services
row = services.event_append(session_id={session_id!r}, run_id=None, event=EngineEvent(
    EventKind.MESSAGE, agent='engineer', content={content!r}, data={{'role': 'assistant'}}))
emit(row.seq)
"""
LIVE_CONTENT = "Live message after the window: it arrives while the reader is at the bottom." + "".join(
    f"\n\nLive paragraph {p}, tall enough that a transcript that did not follow would leave it out of view." for p in range(1, 6)
)

SEQS_JS = "() => Array.from(document.querySelectorAll('#transcript > article[data-seq]')).map(a => Number(a.dataset.seq))"
SCROLL_JS = """
() => { const t = document.getElementById('transcript');
        return {top: t.scrollTop, client: t.clientHeight, height: t.scrollHeight}; }
"""
# The first article the reader sees at the top of #transcript: its seq, where it is on the screen, and
# where it would be with #transcript scrolled to the top (its offset in the scrolled content).
TOP_ARTICLE_JS = """
() => {
  const t = document.getElementById('transcript');
  const box = t.getBoundingClientRect();
  for (const a of t.querySelectorAll(':scope > article[data-seq]')) {
    const r = a.getBoundingClientRect();
    if (r.bottom > box.top + 1) return {seq: Number(a.dataset.seq), top: r.top - box.top, offset: r.top - box.top + t.scrollTop};
  }
  return null;
}
"""
# Whether an article is within the part of #transcript the reader sees (the page itself may need scrolling to it).
SHOWN_JS = """
(seq) => {
  const t = document.getElementById('transcript').getBoundingClientRect();
  const a = document.getElementById('event-' + seq);
  if (!a) return false;
  const r = a.getBoundingClientRect();
  return r.bottom > t.top + 1 && r.top < t.bottom - 1;
}
"""
ARTICLE_TOP_JS = """
(seq) => {
  const t = document.getElementById('transcript');
  const a = document.getElementById('event-' + seq);
  return a ? a.getBoundingClientRect().top - t.getBoundingClientRect().top : null;
}
"""
# Every vertical position #transcript takes from now on (to tell a jump, even one that is put right again).
SCROLL_LOG_JS = """
() => { const t = document.getElementById('transcript'); window.__scrolls = [];
        if (!window.__scrollLog) t.addEventListener('scroll', () => window.__scrolls.push(Math.round(t.scrollTop)));
        window.__scrollLog = true; }
"""


def _seqs(page: Page) -> list[int]:
    return page.evaluate(SEQS_JS)


def _scroll(page: Page) -> dict:
    return page.evaluate(SCROLL_JS)


def _at_bottom(scroll: dict) -> bool:
    return abs(scroll["top"] + scroll["client"] - scroll["height"]) <= BOTTOM_TOLERANCE_PX


def _wait_for_seqs(page: Page, first: int, last: int, timeout: float = 10_000) -> None:
    page.wait_for_function(
        "([first, last]) => { const s = Array.from(document.querySelectorAll('#transcript > article[data-seq]'));"
        " return s.length === last - first + 1 && Number(s[0].dataset.seq) === first && Number(s[s.length - 1].dataset.seq) === last; }",
        arg=[first, last],
        timeout=timeout,
    )


def _settled(page: Page) -> None:
    """Two animation frames: whatever the swap and the scroll handlers do is laid out."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _assert_window(page: Page, first: int, last: int) -> None:
    seqs = _seqs(page)
    nested = page.evaluate("() => document.querySelectorAll('#transcript article').length") - len(seqs)
    assert nested == 0, f"{nested} articles are nested inside #transcript instead of being its children"
    assert seqs == list(range(first, last + 1)), f"expected seqs {first}..{last} once each, in order; got {len(seqs)}: {seqs[:5]}…{seqs[-5:]}"


def _assert_loader(page: Page, more: int | None) -> None:
    loader = page.locator("#transcript > #older-events")
    if more is None:
        expect(loader).to_have_count(0)
        return
    expect(loader).to_have_count(1)
    assert page.evaluate("() => document.getElementById('transcript').firstElementChild.id") == "older-events", "the loader is not at the top of #transcript"
    button = loader.get_by_role("button", name="Load older events")
    expect(button).to_have_count(1)
    expect(button).to_contain_text(f"({more} more)")


class Loads:
    """The older-events requests the page makes."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url) if "/events/" in request.url else None)

    def since(self, count: int) -> list[str]:
        return self.urls[count:]


def _load_older(page: Page, loads: Loads, trigger, first_before: int, first_after: int, last: int) -> None:
    """Scroll to the top with ``trigger``; check one older window came, once, in order, with the reader's place kept.

    The reader's place: at the top of #transcript they look at its first article (``first_before``,
    just under the loader); once the older events are in above it, that article must still be where
    it was on the screen, and stay there (no second load, no late jump).
    """
    requests_before = len(loads.urls)
    # Where the first article is with #transcript at its top: its offset in the scrolled content.
    at_top = page.evaluate(f"(seq) => ({ARTICLE_TOP_JS})(seq) + document.getElementById('transcript').scrollTop", first_before)
    page.evaluate(SCROLL_LOG_JS)
    trigger()
    _wait_for_seqs(page, first_after, last)
    _settled(page)
    after_top = page.evaluate(ARTICLE_TOP_JS, first_before)
    # Watch a little longer: one scroll to the top must make one request, not a cascade of loads.
    page.wait_for_timeout(SETTLE_MS)
    _assert_window(page, first_after, last)
    new = loads.since(requests_before)
    assert len(new) == 1, f"one scroll to the top made {len(new)} older-events requests: {new}"
    assert new[0].endswith(f"/events/?before={first_before}"), new[0]
    scrolls = page.evaluate("window.__scrolls")
    assert abs(after_top - at_top) <= PLACE_TOLERANCE_PX, (
        f"the view jumped: article {first_before} was {at_top:.1f}px below the top of #transcript with the view "
        f"at the top, and is at {after_top:.1f}px once the older events went in above it (scrollTop went {scrolls})"
    )
    still = page.evaluate(ARTICLE_TOP_JS, first_before)
    assert abs(still - after_top) <= 1, (
        f"article {first_before} moved on its own after the load: {after_top:.1f}px, then {still:.1f}px (scrollTop went {scrolls})"
    )


def _focused(page: Page) -> dict:
    return page.evaluate(
        "() => { const e = document.activeElement;"
        " return {tag: e.tagName, text: e.textContent.replace(/\\s+/g, ' ').trim().slice(0, 80), inLoader: !!e.closest('#older-events')}; }"
    )


def test_long_session_opens_at_its_newest_window_and_loads_older_ones_on_scroll(
    e2e_server, live_server_url, context, login, accounts, screenshot
):
    seeded = e2e_server.shell_json(SEED)
    session_id = seeded["id"]
    assert seeded["status"] == "suspended" and seeded["last_seq"] == TOTAL and seeded["runs"] == ["suspended"], seeded
    db_events = e2e_server.db_events(session_id)
    assert [e["seq"] for e in db_events] == list(range(1, TOTAL + 1))

    page = context.new_page()
    page.set_viewport_size({"width": 1280, "height": 900})
    loads = Loads(page)
    login(page, accounts["alice"])
    page.goto(f"{live_server_url}/sessions/{session_id}/")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    # 1. The newest window, scrolled to the bottom, with the loader saying how many more there are.
    _assert_window(page, TOTAL - WINDOW + 1, TOTAL)
    _assert_loader(page, TOTAL - WINDOW)
    _settled(page)
    scroll = _scroll(page)
    assert scroll["height"] > 3 * scroll["client"], f"#transcript does not scroll: {scroll}"
    assert _at_bottom(scroll), f"#transcript did not open at the bottom: {scroll}"
    page.wait_for_timeout(SETTLE_MS)
    assert loads.urls == [], f"the page loaded older events on its own while at the bottom: {loads.urls}"
    assert page.evaluate(SHOWN_JS, TOTAL), f"article {TOTAL} is not in view in #transcript"
    screenshot(page, "1-opened-at-the-newest-window")

    # 2. Scrolled to the top: the window before comes in above, and the reader stays where they were.
    def to_top_by_script() -> None:
        # Scroll and look in one task: the loader's intersect observer cannot fire in between.
        place = page.evaluate(f"() => {{ document.getElementById('transcript').scrollTop = 0; return ({TOP_ARTICLE_JS})(); }}")
        assert place is not None and place["seq"] == TOTAL - WINDOW + 1, f"at the top of #transcript the reader sees {place}"

    _load_older(page, loads, to_top_by_script, TOTAL - WINDOW + 1, TOTAL - 2 * WINDOW + 1, TOTAL)
    _assert_loader(page, TOTAL - 2 * WINDOW)
    assert page.evaluate(SHOWN_JS, TOTAL - WINDOW + 1), f"article {TOTAL - WINDOW + 1} is not in view in #transcript"
    screenshot(page, "2-older-window-loaded-in-place")

    # 3. On up from the keyboard (Home in the focused #transcript: a smooth scroll) until nothing is older.
    def home_key() -> None:
        page.locator("#transcript").focus()
        page.keyboard.press("Home")

    first = TOTAL - 2 * WINDOW + 1
    while first > 1:
        older_first = max(1, first - WINDOW)
        _load_older(page, loads, home_key, first, older_first, TOTAL)
        first = older_first
        _assert_loader(page, first - 1 or None)
    assert loads.since(0) == [
        f"{live_server_url}/sessions/{session_id}/events/?before={before}" for before in (TOTAL - WINDOW + 1, TOTAL - 2 * WINDOW + 1, TOTAL - 3 * WINDOW + 1)
    ], loads.urls
    assert_matches_db(dom_transcript(page), db_events)
    texts = page.evaluate("() => Array.from(document.querySelectorAll('#transcript > article')).map(a => a.textContent)")
    for event, text in zip(db_events, texts):
        if event["kind"] == "message":
            assert f"Window message {event['seq']:04d}" in text, f"article {event['seq']} shows {text[:200]!r}"
    screenshot(page, "3-every-event-loaded")

    # 4. Keyboard, on a fresh load. Enter on the loader button loads the window before, the reader's
    #    view (the bottom) unmoved. Focused without scrolling it into view, which would fire its
    #    intersect trigger: this is Enter alone.
    page.goto(f"{live_server_url}/sessions/{session_id}/")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    _assert_window(page, TOTAL - WINDOW + 1, TOTAL)
    _settled(page)
    assert _at_bottom(_scroll(page))
    requests_before = len(loads.urls)
    page.locator("#older-events button").evaluate("b => b.focus({preventScroll: true})")
    assert _focused(page)["inLoader"]
    page.keyboard.press("Enter")
    _wait_for_seqs(page, TOTAL - 2 * WINDOW + 1, TOTAL)
    _settled(page)
    page.wait_for_timeout(SETTLE_MS)
    _assert_window(page, TOTAL - 2 * WINDOW + 1, TOTAL)
    assert loads.since(requests_before) == [f"{live_server_url}/sessions/{session_id}/events/?before={TOTAL - WINDOW + 1}"]
    assert _at_bottom(_scroll(page)), f"Enter on the loader moved the reader off the bottom: {_scroll(page)}"
    _assert_loader(page, TOTAL - 2 * WINDOW)
    screenshot(page, "4-enter-on-the-loader")
    # Not asserted (a known gap): the button Enter was pressed on is swapped out and focus falls to
    # <body>, so the next Tab starts again at the top of the page. The button has no id, so htmx cannot
    # give focus to the new loader; with one (e.g. id="older-events-button") it would.

    # Tab from #transcript reaches the (new) loader first: a real button in the tab order. Focusing it
    # scrolls it into view, so its intersect trigger loads the window before: one load, in place.
    page.locator("#transcript").focus()
    requests_before = len(loads.urls)
    page.keyboard.press("Tab")
    tabbed = _focused(page)
    assert tabbed["tag"] == "BUTTON" and tabbed["inLoader"], f"Tab from #transcript reached {tabbed}, not the loader"
    assert f"({TOTAL - 2 * WINDOW} more)" in tabbed["text"], tabbed
    _wait_for_seqs(page, TOTAL - 3 * WINDOW + 1, TOTAL)
    page.wait_for_timeout(SETTLE_MS)
    _assert_window(page, TOTAL - 3 * WINDOW + 1, TOTAL)
    assert loads.since(requests_before) == [f"{live_server_url}/sessions/{session_id}/events/?before={TOTAL - 2 * WINDOW + 1}"]

    # 5. Back at the bottom, new events still come in live and #transcript follows them. One appended
    #    through the service from another process, then a real Cancel from the page (the server's own
    #    write). With the in-memory channel layer only the server's note reaches the page, and its
    #    socket reads the gap from the rows; with Redis both notes do. Either way: each once, in order.
    page.locator("#transcript").focus()
    page.keyboard.press("End")
    page.wait_for_function(
        "(tolerance) => { const t = document.getElementById('transcript');"
        " return Math.abs(t.scrollTop + t.clientHeight - t.scrollHeight) <= tolerance; }",
        arg=BOTTOM_TOLERANCE_PX,
    )
    _settled(page)
    shown_from = _seqs(page)[0]
    assert e2e_server.shell_json(APPEND.format(session_id=session_id, content=LIVE_CONTENT)) == TOTAL + 1
    dialogs: list[str] = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.locator("#session-status-box button[data-action=cancel]").click()
    _wait_for_seqs(page, shown_from, TOTAL + 2)
    expect(page.locator("#session-status")).to_have_attribute("data-status", "cancelled")
    _settled(page)
    scroll = _scroll(page)
    assert _at_bottom(scroll), f"#transcript did not follow the new events to the bottom: {scroll}"
    assert page.evaluate(SHOWN_JS, TOTAL + 2), f"article {TOTAL + 2} is not in view in #transcript"
    expect(page.locator(f"#event-{TOTAL + 1}")).to_contain_text("Live message after the window")
    expect(page.locator(f"#event-{TOTAL + 2}")).to_contain_text("Cancelled by alice")
    assert dialogs and "Cancel this session" in dialogs[0], dialogs
    db_after = e2e_server.db_events(session_id)
    assert [(e["seq"], e["kind"], e["agent"]) for e in dom_transcript(page)] == [
        (e["seq"], e["kind"], e["agent"] or "") for e in db_after if e["seq"] >= shown_from
    ]
    screenshot(page, "5-live-events-followed-at-the-bottom")
