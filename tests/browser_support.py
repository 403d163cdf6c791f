"""What the browser tiers share: launching Chromium, logging in, reading the transcript off the page.

Used by the browser tier (``tests/e2e``) and by the system tier's browser tests
(``tests/system``). Playwright is imported lazily, so importing this module
never needs it.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

ARTIFACTS_DIR = Path(os.environ.get("TEST_ARTIFACTS_DIR", "test-artifacts"))
SCREENSHOTS_DIR = ARTIFACTS_DIR / "screenshots"

SESSION_URL = re.compile(r"/sessions/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/$")

# Installed in every document before its own scripts run: counts transcript
# articles present at DOMContentLoaded and every article added afterwards.
LIVE_PROBE = """
(() => {
  window.__e2e = {initial: null, initialSeqs: [], addedSeqs: [], statuses: [], articlesWhenCompleted: null, glance: []};
  document.addEventListener('DOMContentLoaded', () => {
    const transcript = document.getElementById('transcript');
    if (!transcript) return;
    const seqs = (root) => Array.from(root.querySelectorAll('article[data-seq]')).map(a => Number(a.dataset.seq));
    window.__e2e.initialSeqs = seqs(transcript);
    window.__e2e.initial = window.__e2e.initialSeqs.length;
    const badge = document.getElementById('session-status');
    if (badge) window.__e2e.statuses.push(badge.dataset.status);
    new MutationObserver((records) => {
      for (const record of records) {
        for (const node of record.addedNodes) {
          if (node.nodeType !== 1) continue;
          if (node.matches('article[data-seq]')) window.__e2e.addedSeqs.push(Number(node.dataset.seq));
          node.querySelectorAll('article[data-seq]').forEach(a => window.__e2e.addedSeqs.push(Number(a.dataset.seq)));
        }
      }
    }).observe(transcript, {childList: true, subtree: true});
    // The status partial is replaced whole on each push: watch the stable page header around it.
    const head = badge && badge.closest('.session-head');
    if (head) new MutationObserver(() => {
      const now = document.getElementById('session-status');
      if (!now) return;
      window.__e2e.statuses.push(now.dataset.status);
      if (now.dataset.status === 'completed' && window.__e2e.articlesWhenCompleted === null)
        window.__e2e.articlesWhenCompleted = transcript.querySelectorAll('article[data-seq]').length;
    }).observe(head, {childList: true, subtree: true, attributes: true});
    // The glance (plan progress, step, tokens, cost) is replaced whole on each push: keep each distinct reading.
    const readGlance = () => {
      const box = document.getElementById('session-totals');
      if (!box) return;
      const text = (id) => { const el = box.querySelector(`[data-testid="${id}"]`); return el ? el.textContent.trim() : null; };
      const progress = box.querySelector('progress');
      const reading = {done: progress ? Number(progress.value) : null, steps: progress ? Number(progress.max) : null,
                       step: text('step'), tokens: text('tokens'), cost: text('cost'), phase: text('phase')};
      const last = window.__e2e.glance[window.__e2e.glance.length - 1];
      if (!last || JSON.stringify(last) !== JSON.stringify(reading)) window.__e2e.glance.push(reading);
    };
    readGlance();
    const totals = document.getElementById('session-totals');
    if (totals && totals.parentElement) new MutationObserver(readGlance).observe(totals.parentElement, {childList: true, subtree: true});
  });
})();
"""

# Every state the connection indicator takes, in order, from the first paint on.
CONNECTION_PROBE = """
(() => {
  window.__connection = [];
  document.addEventListener('DOMContentLoaded', () => {
    const seen = () => {
      const el = document.getElementById('connection');
      if (el && window.__connection[window.__connection.length - 1] !== el.dataset.state) window.__connection.push(el.dataset.state);
    };
    seen();
    new MutationObserver(seen).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['data-state'], childList: true});
  });
})();
"""

TRANSCRIPT_JS = """
() => Array.from(document.querySelectorAll('#transcript article')).map(a => ({
  seq: Number(a.dataset.seq),
  kind: a.dataset.kind,
  agent: a.dataset.agent,
  text: a.textContent.replace(/\\s+/g, ' ').trim(),
  direct: a.parentElement && a.parentElement.id === 'transcript',
}))
"""


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@contextlib.contextmanager
def launch_chromium() -> Iterator[Browser]:
    """Headless Debian Chromium through Playwright's sync API; missing pieces fail under CI, else skip.

    Open it at most once per package (or module) at a time, never for the whole
    session: while Playwright's sync API is open, asyncio sees a running loop in
    this thread, and every pytest-asyncio test (or ``asyncio.run``) after it
    fails with "Runner.run() cannot be called from a running event loop".
    """
    if not CHROMIUM.exists():
        if under_ci():
            pytest.fail(f"Chromium is required under CI (expected {CHROMIUM})")
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if under_ci():
            pytest.fail("Playwright is required under CI")
        pytest.skip("Playwright is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:120]


def save_screenshot(page: Page, test_name: str, name: str) -> Path:
    """A full-page PNG of ``page`` under <artifacts>/screenshots/."""
    SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS_DIR / f"{slug(test_name)}--{slug(name)}.png"
    # caret="initial": hiding the caret makes Playwright write a style attribute on every input and
    # textarea (left behind as style=""); htmx's settle copies the style of an element with an id onto
    # its pushed copy, which the CSP (style-src 'self') refuses: a violation the test itself caused.
    page.screenshot(path=str(path), full_page=True, caret="initial")
    assert path.stat().st_size > 0, f"empty screenshot {path}"
    return path


def screenshot_failed_pages(contexts, test_name: str) -> None:
    """Best effort: a screenshot of every page still open in ``contexts``, named FAILED-<test>-<i>-<j>."""
    SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
    for ctx_index, ctx in enumerate(contexts):
        for page_index, page in enumerate(ctx.pages):
            try:
                page.screenshot(path=str(SCREENSHOTS_DIR / f"FAILED-{slug(test_name)}-{ctx_index}-{page_index}.png"), full_page=True)
            except Exception:  # noqa: BLE001 - best effort only
                pass


def remove_stale_failure_screenshots(test_name: str) -> None:
    for stale in SCREENSHOTS_DIR.glob(f"FAILED-{slug(test_name)}-*.png"):
        stale.unlink(missing_ok=True)


def log_in(page: Page, base_url: str, username: str, password: str) -> None:
    """Log in through ``base_url``'s /login/ form and land on the sessions list."""
    from playwright.sync_api import expect

    page.goto(base_url + "/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.get_by_role("button", name="Log in", exact=True).click()
    page.wait_for_url(base_url + "/sessions/")
    expect(page.locator("header.topbar nav")).to_contain_text(username)


def start_session(page: Page, base_url: str, task: str, mode: str) -> str:
    """Fill in /sessions/new/, press Start, and return the new session's id from the redirect."""
    page.goto(base_url + "/sessions/new/")
    page.fill("textarea[name=task]", task)
    page.select_option("select[name=mode]", mode)
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_url(SESSION_URL)
    match = SESSION_URL.search(page.url)
    assert match, page.url
    return match.group(1)


def dom_transcript(page: Page) -> list[dict]:
    return page.evaluate(TRANSCRIPT_JS)


def rows(transcript: list[dict]) -> list[tuple]:
    return [(e["seq"], e["kind"], e["agent"], e["text"]) for e in transcript]


def assert_matches_db(transcript: list[dict], db_events: list[dict[str, Any]]) -> None:
    """The page shows every event of the database once, in seq order, as a direct child of #transcript."""
    seqs = [e["seq"] for e in transcript]
    assert len(seqs) == len(set(seqs)), f"duplicate seqs in the DOM: {seqs}"
    assert seqs == list(range(1, len(seqs) + 1)), f"DOM seqs are not 1..N in order: {seqs}"
    assert all(e["direct"] for e in transcript), "an article was swapped in nested instead of appended to #transcript"
    assert len(transcript) == len(db_events), f"DOM shows {len(transcript)} events, the database holds {len(db_events)}"
    assert [(e["seq"], e["kind"], e["agent"]) for e in transcript] == [
        (e["seq"], e["kind"], e["agent"] or "") for e in db_events
    ]
