"""The XSS corpus in a real browser: task text, agent output of the offline model, file names.

Every payload of ``tests/xss_corpus.py`` reaches the live server through the
doors a person has: the new-session form (task and title), the plan card's
"Edit the steps" (the offline control agent then quotes each step in its
messages: agent output), and the code card's "Edit the code" (the code that
runs writes files named after the payloads, and prints them). Each page is
checked when it has loaded, after the run pushed its fragments over the socket
to completion, and after a reload:

* no script ran: the ``xssHit`` trap was never called, no dialog opened, no
  page error, no request to a beacon URL or to another host, no navigation;
* no CSP violation was reported (one would mean injected markup got past the
  sanitiser and only the second wall stopped it);
* the DOM holds only the app's own scripts (no inline ones), no ``<style>``
  and no ``style`` attribute, no ``on*`` attribute, no foreign (SVG/MathML)
  or embedding element, no ``javascript:``/``data:``/``vbscript:`` URL, no htmx
  attribute inside untrusted content, only the sanitiser's tags in rendered
  markdown, no duplicate ids;
* the payloads are on the page as text.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, expect

from orchestrator.engine.offline import topic_of
from tests.browser_support import LIVE_PROBE, SESSION_URL, assert_matches_db, dom_transcript, start_session
from tests.xss_corpus import (
    BEACON,
    CORPUS,
    FORBIDDEN_ATTRIBUTES,
    FORBIDDEN_TAGS,
    FORM_SAFE,
    NUL_PAYLOADS,
    TRAP,
    URL_ATTRIBUTES,
    file_paths,
    plan_steps,
    squeeze,
    step_text,
)

pytestmark = pytest.mark.browser

RUN_TIMEOUT_MS = 30_000
LIVE_TIMEOUT_MS = 15_000

# Before any script of a document: the trap every payload calls, and a record of CSP violations.
TRAP_JS = f"""
(() => {{
  const hits = [], violations = [];
  Object.defineProperty(window, {TRAP!r}, {{value: (id) => {{ hits.push(String(id)); }}, writable: false, configurable: false}});
  Object.defineProperty(window, '__xssHits', {{value: hits}});
  Object.defineProperty(window, '__cspViolations', {{value: violations}});
  document.addEventListener('securitypolicyviolation', (e) => violations.push(
    `${{e.violatedDirective}} blocked ${{e.blockedURI}} (${{(e.sample || '').slice(0, 80)}})`), true);
}})();
"""

# The sanitiser's allow-list (sessions.rendering), stated here on purpose: widening it must be a visible decision.
PROSE_TAGS = [
    "a", "p", "br", "hr", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span", "div", "del",
]
PROSE_ATTRIBUTES = {"a": ["href", "title", "rel"], "span": ["class"], "div": ["class"], "code": ["class"], "th": ["align"], "td": ["align"]}
# Where untrusted text is shown: nothing in here may carry htmx or socket attributes.
UNTRUSTED = (
    "#transcript article, .task-card, .session-head h1, .approval-card > p, .approval-card ol, "
    ".approval-card pre, .approval-card header a, table.sessions td"
)

DOM_CHECK_JS = """
(c) => {
  const problems = [];
  const show = (el) => el.outerHTML.slice(0, 300);
  const forbiddenTags = new Set(c.forbiddenTags), forbiddenAttrs = new Set(c.forbiddenAttrs);
  const urlAttrs = new Set(c.urlAttrs), proseTags = new Set(c.proseTags);
  const files = c.sessionId ? `/sessions/${c.sessionId}/files/` : null;
  const scripty = (v) => /^(javascript|vbscript|data|livescript|mocha):/i.test(
    v.replace(/[\\u0000-\\u0020\\u200b\\u200c\\u200d\\ufeff]+/g, ''));
  const active = (n) => urlAttrs.has(n) || forbiddenAttrs.has(n) || /^(on|hx-|ws-|data-hx-)/.test(n);
  const ids = new Map();
  for (const el of document.querySelectorAll('*')) {
    const tag = el.localName;
    if (el.namespaceURI !== 'http://www.w3.org/1999/xhtml') problems.push('foreign element: ' + show(el));
    if (forbiddenTags.has(tag)) problems.push(`<${tag}> element: ` + show(el));
    if (tag === 'script' && !(el.closest('head') && c.scripts.includes(el.getAttribute('src'))))
      problems.push('a script that is not the app\\'s: ' + show(el));
    if (tag === 'link' && !(el.closest('head') && (el.rel === 'stylesheet' || el.rel === 'icon') && (el.getAttribute('href') || '').startsWith('/static/')))
      problems.push('a link element that is not the app\\'s stylesheet or icon: ' + show(el));
    if (tag === 'meta' && (!el.closest('head') || el.hasAttribute('http-equiv')))
      problems.push('a meta element: ' + show(el));
    if (tag === 'img' && !(files && el.classList.contains('artifact-image') && (el.getAttribute('src') || '').startsWith(files)))
      problems.push('an image that is not one of the session\\'s files: ' + show(el));
    if (el.id) ids.set(el.id, (ids.get(el.id) || 0) + 1);
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase(), value = attr.value;
      if (name.startsWith('on')) problems.push(`event handler ${name}: ` + show(el));
      if (forbiddenAttrs.has(name)) problems.push(`attribute ${name}: ` + show(el));
      if (urlAttrs.has(name) && scripty(value)) problems.push(`script or data URL in ${name}: ` + show(el));
      if (/^(hx-|ws-|data-hx-)/.test(name) && el.closest(c.untrusted)) problems.push(`${name} in untrusted content: ` + show(el));
      if ((value.includes(c.trap) || value.includes(c.beacon)) && active(name)) {
        const ownFile = files && (tag === 'a' || tag === 'img') && (name === 'href' || name === 'src') && value.startsWith(files);
        const sanitisedLink = tag === 'a' && name === 'href' && el.closest('.prose') && el.rel === 'noopener noreferrer nofollow';
        if (!ownFile && !sanitisedLink) problems.push(`payload in ${name}: ` + show(el));
      }
    }
  }
  for (const [id, n] of ids) if (n > 1) problems.push(`id ${id} appears ${n} times`);
  // Rendered markdown holds the sanitiser's tags and attributes only.
  for (const el of document.querySelectorAll('.prose *')) {
    if (!proseTags.has(el.localName)) problems.push('in rendered markdown: ' + show(el));
    for (const attr of el.attributes)
      if (!(c.proseAttrs[el.localName] || []).includes(attr.name)) problems.push(`attribute ${attr.name} in rendered markdown: ` + show(el));
  }
  for (const a of document.querySelectorAll('a[href]'))
    if (!['http:', 'https:', 'mailto:'].includes(a.protocol)) problems.push(`a link to ${a.protocol}: ` + show(a));
  for (const f of document.querySelectorAll('form')) {
    if (new URL(f.action, location.href).origin !== location.origin) problems.push('a form posting elsewhere: ' + show(f));
    if (f.closest(c.untrusted)) problems.push('a form in untrusted content: ' + show(f));
  }
  for (const sheet of document.styleSheets)
    if (!sheet.href || !sheet.href.startsWith(location.origin + '/static/')) problems.push('a style sheet that is not the app\\'s: ' + (sheet.href || 'inline'));
  if (document.adoptedStyleSheets.length) problems.push('adopted style sheets');
  if (document.title !== c.title) problems.push(`document.title is ${JSON.stringify(document.title)}`);
  return {
    problems,
    hits: window.__xssHits ? Array.from(window.__xssHits) : ['the trap is missing'],
    csp: window.__cspViolations ? Array.from(window.__cspViolations) : [],
    scripts: Array.from(document.scripts).map(s => s.getAttribute('src')),
    sameDocument: window.__xss_same_document === true,
  };
}
"""


BENIGN_CONSOLE = re.compile(r"^(error|warning): Failed to load resource: the server responded with a status of (400|404) ")


@dataclass
class Watch:
    """What a page did that no page of this app does on its own."""

    origin: str
    session_id: str | None = None
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        def on_dialog(dialog):
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}") if msg.type in ("error", "warning") else None)
        page.on("request", self._on_request)

    def _on_request(self, request) -> None:
        url = request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about"):
            self.requests.append(url[:200])
            return
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.requests.append(url[:200])
        elif BEACON.rstrip("/") in parts.path or TRAP in url:
            own = self.session_id and parts.path.startswith(f"/sessions/{self.session_id}/files/")
            if not own:
                self.requests.append(url[:200])


def baseline_scripts(page: Page, base_url: str) -> list[str]:
    """The app's own script URLs, read off a page without untrusted content, which must itself pass the checks."""
    page.goto(base_url + "/sessions/new/")
    scripts = page.eval_on_selector_all("script", "els => els.map(e => e.getAttribute('src'))")
    assert scripts and all(s and s.startswith("/static/") for s in scripts), f"the app has inline scripts: {scripts}"
    assert page.locator("style, [style]").count() == 0, "the app itself uses inline styles: the style checks would be void"
    return scripts


def assert_inert(page: Page, watch: Watch, scripts: list[str], title: str, when: str) -> None:
    result = page.evaluate(
        DOM_CHECK_JS,
        {
            "scripts": scripts, "sessionId": watch.session_id, "title": title, "trap": TRAP, "beacon": BEACON,
            "forbiddenTags": sorted(FORBIDDEN_TAGS), "forbiddenAttrs": sorted(FORBIDDEN_ATTRIBUTES),
            "urlAttrs": sorted(URL_ATTRIBUTES), "proseTags": PROSE_TAGS, "proseAttrs": PROSE_ATTRIBUTES,
            "untrusted": UNTRUSTED,
        },
    )
    csp_console = [m for m in watch.console if "Content Security Policy" in m or "Refused to" in m]
    # Refused forms (400) and the favicon (404) are the app's own; any other console error is reported.
    other_console = [m for m in watch.console if m not in csp_console and not BENIGN_CONSOLE.match(m)]
    failures = {
        "DOM": result["problems"],
        "trap calls": result["hits"],
        "dialogs": watch.dialogs,
        "page errors": watch.errors,
        "CSP violations (events)": result["csp"],
        "CSP violations (console)": csp_console,
        "console errors": other_console,
        "unexpected requests": watch.requests,
    }
    failures = {k: v for k, v in failures.items() if v}
    assert not failures, f"{when}: {page.url}\n" + json.dumps(failures, indent=1, ensure_ascii=False)[:12000]
    assert result["sameDocument"], f"{when}: the page navigated away or reloaded by itself ({page.url})"


def mark_document(page: Page) -> None:
    page.evaluate("window.__xss_same_document = true")


def open_page(context, watch: Watch) -> Page:
    page = context.new_page()
    watch.attach(page)
    return page


def texts_of(page: Page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")


def page_title(session_title: str) -> str:
    return f"{session_title} · CMBAgent Web"


def wait_completed(page: Page, e2e_server, session_id: str) -> list[dict]:
    expect(page.locator("#session-status")).to_have_attribute("data-status", "completed", timeout=RUN_TIMEOUT_MS)
    db_events = e2e_server.db_events(session_id)
    expect(page.locator("#transcript article[data-seq]")).to_have_count(len(db_events), timeout=RUN_TIMEOUT_MS)
    assert_matches_db(dom_transcript(page), db_events)
    return db_events


def wait_for_card(page: Page, kind: str):
    """The pending card, once the run has stopped for it.

    Every push re-sends the cards (hx-swap-oob replaces them whole), and the
    run's last push (the waiting_approval status) can come after the card:
    whatever was typed into the card before that push is lost with it.
    """
    expect(page.locator("#session-status")).to_have_attribute("data-status", "waiting_approval", timeout=RUN_TIMEOUT_MS)
    card = page.locator("#approval-cards article.approval-card")
    expect(card).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    expect(card).to_have_attribute("data-kind", kind)
    return card


def reload_live(page: Page) -> None:
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=LIVE_TIMEOUT_MS)
    expect(page.locator("#session-status")).to_have_attribute("data-status", "completed")
    mark_document(page)


def pushed_live(page: Page, seqs: list[int]) -> None:
    pushed = set(page.evaluate("window.__e2e.addedSeqs"))
    assert set(seqs) <= pushed, f"events {sorted(set(seqs) - pushed)} were not pushed over the socket"


# --- task text --------------------------------------------------------------------------

TITLE = "</title><script>xssHit('form-title')</script>\"><img src=x onerror=xssHit('form-title')> {{7*7}} <style>*{}</style>"


def test_task_text_payloads_are_inert(e2e_server, live_server_url, new_context, login, accounts):
    """All form-safe payloads in one task (and a hostile title), typed into the new-session form: the task card,
    heading, title and list show them as text, live and after a reload, and the offline agents' messages that
    quote the task stay inert; payloads with NUL are refused by the form."""
    context = new_context()
    context.add_init_script(TRAP_JS)
    context.add_init_script(LIVE_PROBE)
    watch = Watch(origin=live_server_url)
    page = open_page(context, watch)
    login(page, accounts["alice"])
    scripts = baseline_scripts(page, live_server_url)
    mark_document(page)
    assert_inert(page, watch, scripts, "New session · CMBAgent Web", "clean new-session page")

    # NUL characters cannot be typed in: the form refuses the task and nothing is created.
    before = e2e_server.db_session_count("alice")
    page.fill("textarea[name=task]", "\n\n".join(p.text for p in NUL_PAYLOADS))
    assert "\x00" in page.input_value("textarea[name=task]"), "the browser dropped the NUL: nothing would be tested"
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Start", exact=True).click()
    assert posted.value.status == 400
    expect(page.get_by_role("alert")).to_contain_text("Null characters are not allowed.")
    mark_document(page)
    assert_inert(page, watch, scripts, "New session · CMBAgent Web", "form refusing NUL")
    assert e2e_server.db_session_count("alice") == before

    # The form given back with an error holds every payload in its fields (</textarea> and quotes included).
    task = "\n\n".join(p.text for p in FORM_SAFE)
    page.fill("textarea[name=task]", task)
    page.fill("input[name=title]", TITLE)
    page.select_option("select[name=mode]", "one_shot")
    page.fill("input[name=max_rounds]", "0")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Start", exact=True).click()
    assert posted.value.status == 400
    mark_document(page)
    assert_inert(page, watch, scripts, "New session · CMBAgent Web", "form given back with the payloads")
    assert page.input_value("textarea[name=task]").replace("\r\n", "\n") == task
    assert page.input_value("input[name=title]") == TITLE
    assert e2e_server.db_session_count("alice") == before

    page.fill("input[name=max_rounds]", "")
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_url(SESSION_URL)
    session_id = SESSION_URL.search(page.url).group(1)
    watch.session_id = session_id
    mark_document(page)
    stored = e2e_server.db_session(session_id)
    # Browsers send a textarea's line breaks as CRLF; nothing else may change on the way in.
    assert stored["task"].replace("\r\n", "\n") == task, "the task changed on the way in: the payloads would not be the corpus"
    task = stored["task"]
    title = page_title(TITLE)
    assert_inert(page, watch, scripts, title, "session page as loaded")

    db_events = wait_completed(page, e2e_server, session_id)
    # The offline agents quote the task (its first words, markdown marks removed) in their messages.
    topic = squeeze(topic_of(task))
    quoting = [e["seq"] for e in db_events if e["kind"] == "message" and topic in squeeze(e["content"])]
    assert quoting, f"no agent message quotes the task's topic {topic!r}"
    pushed_live(page, quoting)

    for state in ("live", "reloaded"):
        if state == "reloaded":
            reload_live(page)
        assert_inert(page, watch, scripts, title, f"session page, {state}")
        card = squeeze(page.locator(".task-card .prose").text_content())
        missing = [p.id for p in FORM_SAFE if squeeze(p.visible) not in card]
        assert missing == [], f"{state}: the task card does not show these payloads as text: {missing}"
        expect(page.locator(".session-head h1")).to_have_text(TITLE)
        for seq in quoting:
            assert topic in squeeze(page.locator(f'#transcript article[data-seq="{seq}"] .prose').text_content())

    response = page.goto(live_server_url + "/sessions/")
    # The second wall the CSP checks rely on: no inline script or style may run even if markup got through.
    policy = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy and "style-src 'self'" in policy, policy
    mark_document(page)
    assert_inert(page, watch, scripts, "Sessions · CMBAgent Web", "sessions list")
    expect(page.locator(f"#session-row-{session_id} a")).to_have_text(TITLE)

    # The checks are not blind: markup spliced in as a sanitiser bypass would land is reported.
    page.evaluate(
        """() => {
          const div = document.createElement('div');
          div.innerHTML = `<img src=x onerror="xssHit('self-test')"><p style="color:red">styled</p><svg><a href="javascript:xssHit(1)">x</a></svg>`;
          document.querySelector('main').append(div);
          xssHit('self-test-direct');
        }"""
    )
    page.wait_for_timeout(200)  # let the image fail and the CSP report arrive
    with pytest.raises(AssertionError) as caught:
        assert_inert(page, watch, scripts, "Sessions · CMBAgent Web", "self-test")
    report = str(caught.value)
    for expected in ("event handler onerror", "attribute style", "foreign element", "self-test-direct", "CSP violations"):
        assert expected in report, f"the checks missed {expected!r}:\n{report}"


# --- agent output -----------------------------------------------------------------------


def test_agent_output_payloads_are_inert(e2e_server, live_server_url, new_context, login, accounts):
    """A hitl_plan session: the plan is edited into steps made of every form-safe payload; the offline control
    agent quotes each step in a message (agent output, rendered as markdown), pushed live and shown after a
    reload. The plan card (owner's page and the staff queue) shows the planner's quoting of the task inert too."""
    context = new_context()
    context.add_init_script(TRAP_JS)
    context.add_init_script(LIVE_PROBE)
    watch = Watch(origin=live_server_url)
    page = open_page(context, watch)
    login(page, accounts["alice"])
    scripts = baseline_scripts(page, live_server_url)

    first_words = [p for p in FORM_SAFE if p.category in ("break", "handler")]
    task = " ".join(p.flat for p in first_words)
    session_id = start_session(page, live_server_url, task, "hitl_plan")
    watch.session_id = session_id
    mark_document(page)
    title = page_title(" ".join(task.split())[:80].strip())
    assert_inert(page, watch, scripts, title, "hitl_plan page as loaded")

    card = wait_for_card(page, "plan")
    assert_inert(page, watch, scripts, title, "plan card shown")
    topic = squeeze(topic_of(task))
    assert topic in squeeze(card.locator("ol.plan").text_content()), "the plan card does not quote the task"

    # The staff queue shows the same card, with the session's (hostile) title.
    staff_context = new_context()
    staff_context.add_init_script(TRAP_JS)
    staff_watch = Watch(origin=live_server_url)
    staff = open_page(staff_context, staff_watch)
    login(staff, accounts["carol"])
    staff_scripts = baseline_scripts(staff, live_server_url)
    staff.goto(live_server_url + "/approvals/")
    expect(staff.locator("#connection")).to_have_attribute("data-state", "live", timeout=LIVE_TIMEOUT_MS)
    mark_document(staff)
    queue_card = staff.locator(f'#approval-rows article.approval-card:has(a[href="/sessions/{session_id}/"])')
    expect(queue_card).to_have_count(1)
    expect(queue_card.locator(f'header a[href="/sessions/{session_id}/"]')).to_have_text(title.removesuffix(" · CMBAgent Web"))
    assert topic in squeeze(queue_card.locator("ol.plan").text_content())
    assert_inert(staff, staff_watch, staff_scripts, "Approval queue · CMBAgent Web", "staff approval queue")

    # Edit the plan: one step per line, every payload quoted verbatim (on one line) in some step.
    steps = plan_steps()
    lines = "\n".join(f"[researcher] {step_text(step)}" for step in steps)
    feedback = "\n".join(p.text for p in FORM_SAFE[:20])
    card.locator("summary", has_text="Edit the steps").click()
    card.locator('textarea[name="steps"]').fill(lines)
    card.locator('textarea[name="feedback"]').fill(feedback)
    with page.expect_response(lambda r: r.request.method == "POST" and "/approvals/" in r.url) as posted:
        card.get_by_role("button", name="Edit", exact=True).click()
    assert posted.value.status == 204, posted.value.text()

    db_events = wait_completed(page, e2e_server, session_id)
    [decision] = [e for e in db_events if e["kind"] == "decision"]
    assert "edited" in decision["content"] and step_text(steps[0]) in decision["content"], decision["content"][:500]
    control = [e for e in db_events if e["kind"] == "message" and e["agent"] == "control" and "**Step " in e["content"]]
    assert len(control) == len(steps), f"control announced {len(control)} steps, the edited plan has {len(steps)}"
    said = "\n".join(e["content"] for e in control)
    not_quoted = [p.id for p in FORM_SAFE if p.flat not in said]
    assert not_quoted == [], f"the offline control agent did not quote these payloads: {not_quoted}"
    pushed_live(page, [e["seq"] for e in control])

    for state in ("live", "reloaded"):
        if state == "reloaded":
            reload_live(page)
        assert_inert(page, watch, scripts, title, f"agent output, {state}")
        shown = {
            int(m.group(1)): squeeze(text)
            for text in texts_of(page, '#transcript article[data-kind="message"][data-agent="control"] .prose')
            if (m := re.search(r"Step (\d+)/", text))
        }
        assert sorted(shown) == list(range(1, len(steps) + 1)), sorted(shown)
        missing = [
            p.id for number, step in enumerate(steps, 1) for p in step
            if squeeze(" ".join(p.visible.split())) not in shown[number]
        ]
        assert missing == [], f"{state}: these payloads are not shown as text in control's messages: {missing}"
        blockquote = page.locator('#transcript article[data-kind="decision"] blockquote').text_content()
        assert all(p.text in blockquote for p in FORM_SAFE[:20]), "the feedback is not shown verbatim"

    # The queue emptied live and stayed inert.
    expect(queue_card).to_have_count(0, timeout=LIVE_TIMEOUT_MS)
    assert_inert(staff, staff_watch, staff_scripts, "Approval queue · CMBAgent Web", "staff queue after the decision")


# --- file names -----------------------------------------------------------------------

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def hostile_code(paths: list[str]) -> str:
    """Code that writes a file at each path, then prints every payload (as literals: they show highlighted)."""
    listed = base64.b64encode(json.dumps(paths).encode()).decode()
    literals = "\n".join(f"    {repr(p.text).replace('`', chr(92) + 'x60')}," for p in FORM_SAFE)
    return (
        "import base64, json, os\n\n"
        f'PNG = base64.b64decode("{PNG_1PX}")\n'
        f'PATHS = json.loads(base64.b64decode("{listed}"))\n'
        "for path in PATHS:\n"
        "    folder = os.path.dirname(path)\n"
        "    if folder:\n"
        "        os.makedirs(folder, exist_ok=True)\n"
        "    with open(path, 'wb') as fh:\n"
        "        fh.write(PNG if path.endswith('.png') else b'written by the xss corpus\\n')\n\n"
        f"PAYLOADS = [\n{literals}\n]\n"
        "for text in PAYLOADS:\n"
        "    print(text)\n"
    )


def test_file_name_payloads_are_inert(e2e_server, live_server_url, new_context, login, accounts):
    """A one_shot session that asks before running code: the code is edited on the card into code that writes a
    file named after every form-safe payload (the attribute breakers also as images, whose names go into alt)
    and prints every payload. The file list, links, images, highlighted code and output stay inert, live and
    after a reload, and every file is served as a download or an inert image."""
    task = "Plot a damped cosine. " + " ".join(p.flat for p in CORPUS[:6] if not p.nul)
    session_id = e2e_server.shell_json(
        "from django.contrib.auth import get_user_model\n"
        "from sessions import services\n"
        f"session = services.session_start(owner=get_user_model().objects.get(username='alice'), task={task!r}, "
        "mode='one_shot', config={'approve_code': True})\n"
        "emit(str(session.pk))\n"
    )
    context = new_context()
    context.add_init_script(TRAP_JS)
    context.add_init_script(LIVE_PROBE)
    watch = Watch(origin=live_server_url, session_id=session_id)
    page = open_page(context, watch)
    login(page, accounts["alice"])
    scripts = baseline_scripts(page, live_server_url)
    page.goto(f"{live_server_url}/sessions/{session_id}/")
    mark_document(page)
    title = page_title(" ".join(task.split())[:80].strip())

    card = wait_for_card(page, "code")
    assert_inert(page, watch, scripts, title, "code card shown")

    paths = file_paths()
    code = hostile_code(paths)
    card.locator("summary", has_text="Edit the code").click()
    card.locator('textarea[name="code"]').fill(code)
    with page.expect_response(lambda r: r.request.method == "POST" and "/approvals/" in r.url) as posted:
        card.get_by_role("button", name="Edit", exact=True).click()
    assert posted.value.status == 204, posted.value.text()

    db_events = wait_completed(page, e2e_server, session_id)
    results = [e for e in db_events if e["kind"] == "tool_result"]
    assert results and "exitcode: 0" in results[-1]["content"], results
    artifacts = [e for e in db_events if e["kind"] == "artifact"]
    [decision] = [e for e in db_events if e["kind"] == "decision"]
    assert "edited" in decision["content"] and "PAYLOADS = [" in decision["content"], decision["content"][:500]
    assert sorted(e["content"] for e in artifacts) == sorted(paths), "the files written are not the corpus's names"
    pushed_live(page, [e["seq"] for e in artifacts])

    for state in ("live", "reloaded"):
        if state == "reloaded":
            reload_live(page)
        assert_inert(page, watch, scripts, title, f"file names, {state}")
        shown = texts_of(page, "#transcript article[data-kind=artifact] .artifact a code")
        assert sorted(shown) == sorted(paths), f"{state}: the file names are not shown as text"
        alts = page.eval_on_selector_all("#transcript img.artifact-image", "els => els.map(e => e.getAttribute('alt'))")
        assert sorted(alts) == sorted(p for p in paths if p.endswith(".png"))
        output = "\n".join(texts_of(page, '#transcript article[data-kind="tool_result"] pre.output'))
        missing = [p.id for p in FORM_SAFE if p.text not in output]
        assert missing == [], f"{state}: the printed payloads are not shown verbatim: {missing}"
        code_shown = "\n".join(texts_of(page, '#transcript article[data-kind="tool_call"] pre'))
        assert "PAYLOADS = [" in code_shown and "xssHit('script-basic')" in code_shown

    # Every file is reachable under its hostile name, and none is served as something a browser would render.
    hrefs = page.eval_on_selector_all("#transcript .artifact a[href]", "els => els.map(e => e.getAttribute('href'))")
    assert len(hrefs) == len(paths)
    for href in hrefs:
        response = page.request.get(live_server_url + href)
        assert response.status == 200, href
        headers = response.headers
        assert headers.get("x-content-type-options") == "nosniff", href
        assert "sandbox" in headers.get("content-security-policy", ""), href
        if headers.get("content-type") != "image/png":
            assert headers.get("content-disposition", "").startswith("attachment"), (href, headers)
