"""The XSS corpus through the server's renderers and pages, without a browser.

Every payload of ``tests/xss_corpus.py`` is rendered as markdown, as
highlighted code, and in every place the session page, the pushed fragment,
the sessions list and the staff approval queue show untrusted text (task,
title, each kind of event, approval cards, file names). Each result is parsed
with ``html.parser`` and must hold no element, attribute or URL that a
harmless text does not also produce there; the payload's markup must be on the
page as text.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
from django.urls import reverse

from approvals.models import ApprovalRequest
from sessions.fragments import render_push
from sessions.services import storable
from sessions.models import Event, Session, SessionState
from sessions.rendering import ALLOWED_ATTRIBUTES, ALLOWED_TAGS, highlight_code, render_markdown
from tests.xss_corpus import (
    BEACON,
    CORPUS,
    FORBIDDEN_ATTRIBUTES,
    FORBIDDEN_TAGS,
    IDS,
    TRAP,
    URL_ATTRIBUTES,
    Collector,
    Payload,
    active_attribute,
    collect,
    control_message,
    file_path_for,
    plan_steps,
    scripty_url,
    squeeze,
    step_text,
)

BENIGN = Payload(id="benign", category="control", text="A harmless task about the CMB power spectrum.")


def _attr_problems(tag: str, name: str, value: str) -> list[str]:
    problems = []
    if name.startswith("on"):
        problems.append(f"<{tag} {name}> event handler")
    if name in FORBIDDEN_ATTRIBUTES:
        problems.append(f"<{tag} {name}> forbidden attribute")
    if name in URL_ATTRIBUTES and scripty_url(value):
        problems.append(f"<{tag} {name}={value!r}> script/data URL")
    return problems


def fragment_problems(markup: str, tags: set[str], attributes: dict[str, set[str]]) -> list[str]:
    """What in a rendered fragment is outside the allow-list (tags, attributes per tag, URL schemes)."""
    problems = []
    for element in collect(markup).elements:
        if element.tag not in tags:
            problems.append(f"<{element.tag}> is not an allowed tag")
        for name, value in element.attrs:
            if name not in attributes.get(element.tag, set()):
                problems.append(f"<{element.tag} {name}={value!r}> is not an allowed attribute")
            problems += _attr_problems(element.tag, name, value)
    return problems


# --- the renderers -----------------------------------------------------------------

MARKDOWN_ATTRIBUTES = {tag: set(names) for tag, names in ALLOWED_ATTRIBUTES.items()}
MARKDOWN_ATTRIBUTES["a"] = MARKDOWN_ATTRIBUTES.get("a", set()) | {"rel"}


@pytest.mark.parametrize("payload", CORPUS, ids=IDS)
def test_markdown_keeps_payload_inert_and_visible(payload):
    rendered = str(render_markdown(payload.text))
    assert fragment_problems(rendered, set(ALLOWED_TAGS), MARKDOWN_ATTRIBUTES) == [], rendered
    for element in collect(rendered).elements:
        if element.tag == "a":
            assert dict(element.attrs).get("rel") == "noopener noreferrer nofollow", rendered
    text = squeeze(collect(rendered).text)
    assert squeeze(payload.visible) in text, f"{payload.visible!r} is not shown as text in:\n{rendered}"


@pytest.mark.parametrize("payload", CORPUS, ids=IDS)
def test_highlighted_code_is_the_payload_as_text(payload):
    rendered = str(highlight_code(payload.text))
    assert fragment_problems(rendered, {"pre", "code", "span"}, {"pre": {"class"}, "code": {"class"}, "span": {"class"}}) == [], rendered
    # Pygments drops a leading byte-order mark; everything else is there, character for character.
    assert payload.text.lstrip("\ufeff") in collect(rendered).text


@pytest.mark.parametrize("number", range(len(plan_steps())))
def test_plan_steps_quoted_by_control_show_each_payload(number):
    """The browser tier edits a plan into these steps; the offline control agent quotes each in a message.
    Packed several to a step, each payload must still be shown as text in that message."""
    steps = plan_steps()
    assert len(steps) <= 20, "an edited plan may have at most 20 steps"
    step = steps[number]
    rendered = str(render_markdown(control_message(number + 1, len(steps), step_text(step))))
    assert fragment_problems(rendered, set(ALLOWED_TAGS), MARKDOWN_ATTRIBUTES) == [], rendered
    text = squeeze(collect(rendered).text)
    missing = [p.id for p in step if squeeze(Payload(p.id, "", p.flat, p.shows and " ".join(p.shows.split())).visible) not in text]
    assert missing == [], f"not shown as text: {missing}\n{rendered}"


# --- the pages -----------------------------------------------------------------------

pages = pytest.mark.django_db


def _session_with(owner, payload: Payload) -> tuple[Session, list[Event]]:
    """A session whose task, title and every kind of event carry ``payload``, waiting on a plan and a code card.

    The rows hold the payload as the services store it (``storable``: NUL, which
    PostgreSQL cannot keep, becomes U+FFFD), so the same pages render on both databases.
    """
    text = storable(payload.text)
    session = Session.objects.create(
        owner=owner, task=text, title=text[:200], mode="hitl_plan", status=Session.Status.WAITING_APPROVAL,
    )
    SessionState.objects.create(session=session, current_phase=text[:40])
    path = storable(file_path_for(payload))
    step = {"agent": text, "description": text}
    rows = [
        ("task", "user", text, {}),
        ("message", text[:60], text, {"role": text}),
        ("tool_call", "executor", text, {"calls": [{"name": text, "arguments": json.dumps({"code": text})}, {"name": "x", "arguments": text}]}),
        ("tool_result", "executor", text, {"name": text, "is_error": True}),
        ("handoff", text[:60], text, {}),
        ("phase", "", text, {}),
        ("plan", "planner", text, {"steps": [step]}),
        ("step", "control", text, {"step": text, "of": text}),
        ("artifact", "executor", path, {"path": path, "kind": "data", "size": 12}),
        ("artifact", "executor", path + ".png", {"path": path + ".png", "kind": "image", "size": 12}),
        ("approval", "", text, {"request": text, "plan": [step], "code": text, "error": text, "options": [text, "approve"]}),
        ("decision", "human", text, {"request": text, "decision": text, "by": text, "feedback": text}),
        ("error", "", text, {}),
        ("status", "", text, {"status": text}),
        (text[:20], text[:60], text, {}),
    ]
    events = [
        Event.objects.create(session=session, seq=seq, kind=kind, agent=agent, content=content, data=data)
        for seq, (kind, agent, content, data) in enumerate(rows, 1)
    ]
    session.last_seq = len(events)
    session.save(update_fields=["last_seq"])
    for seq, kind, options, extra in (
        (11, "plan", ["approve", "reject", "edit"], {"plan": [step]}),
        (None, "code", ["allow", "allow_session", "deny", "edit"], {"code": text, "error": text}),
    ):
        ApprovalRequest.objects.create(
            session=session, event_seq=seq, kind=kind, question=text, options=options, payload=extra
        )
    return session, events


def _profile(parsed: Collector) -> tuple[Counter, set[tuple[str, str]]]:
    return Counter(e.tag for e in parsed.elements), {(e.tag, name) for e in parsed.elements for name, _ in e.attrs}


def page_problems(parsed: Collector, baseline: Collector, session: Session) -> list[str]:
    """What ``markup`` (a page with the payload) has that ``baseline`` (the same page with a harmless text) has not.

    Markdown may add its allowed tags and attributes; nothing else may appear.
    Scripts must be the baseline's, URLs may not run script, and the payload's
    marks (the trap's name, the beacon) may appear in no attribute that loads,
    runs or wires anything (URLs, handlers, htmx) except the links and images
    of the session's own files and the href of a sanitised link. (Escaped in
    a text-like attribute, ``alt``, ``title``, ``class``, ``data-*``, they are
    inert; had they escaped it, new attributes or tags would show above.)
    """
    tags, pairs = _profile(parsed)
    base_tags, base_pairs = _profile(baseline)
    problems = []
    for tag, count in tags.items():
        if count > base_tags.get(tag, 0) and tag not in ALLOWED_TAGS:
            problems.append(f"{count - base_tags.get(tag, 0)} more <{tag}> than with a harmless text")
    for tag, name in pairs - base_pairs:
        if name not in MARKDOWN_ATTRIBUTES.get(tag, set()):
            problems.append(f"<{tag} {name}> appears only with the payload")
    files = f"/sessions/{session.pk}/files/"
    base_scripts = sorted(dict(e.attrs).get("src", "") for e in baseline.elements if e.tag == "script")
    ids = Counter()
    for element in parsed.elements:
        attrs = dict(element.attrs)
        if element.tag in FORBIDDEN_TAGS:
            problems.append(f"<{element.tag}> element")
        if element.tag == "img" and not (attrs.get("src", "").startswith(files) and "artifact-image" in element.classes):
            problems.append(f"<img {attrs}> is not one of the session's files")
        if "id" in attrs:
            ids[attrs["id"]] += 1
        for name, value in element.attrs:
            problems += _attr_problems(element.tag, name, value)
            if (TRAP in value or BEACON in value) and active_attribute(name):
                own_file = element.tag in ("a", "img") and name in ("href", "src") and value.startswith(files)
                sanitised_link = element.tag == "a" and name == "href" and "rel" in attrs and not scripty_url(value)
                if not (own_file or sanitised_link):
                    problems.append(f"payload in <{element.tag} {name}={value!r}>")
    scripts = sorted(dict(e.attrs).get("src", "") for e in parsed.elements if e.tag == "script")
    if scripts != base_scripts:
        problems.append(f"scripts {scripts} differ from the harmless page's {base_scripts}")
    problems += [f"id {name!r} appears {n} times" for name, n in ids.items() if n > 1]
    return problems


@pytest.fixture
def pages_of(client, alice, approver):
    """(session page, pushed fragment, sessions list, staff queue) for a session made of ``payload``."""

    def render(payload: Payload) -> tuple[Session, list[Event], dict[str, str]]:
        session, events = _session_with(alice, payload)
        client.force_login(alice)
        detail = client.get(session.get_absolute_url())
        assert detail.status_code == 200
        listing = client.get(reverse("sessions:list"))
        assert listing.status_code == 200
        client.force_login(approver)
        queue = client.get(reverse("approvals:queue"))
        assert queue.status_code == 200
        out = {
            "detail": detail.content.decode(),
            "push": render_push(session, events),
            "list": listing.content.decode(),
            "queue": queue.content.decode(),
        }
        # Start the next render from a clean slate: one session in the list, its cards in the queue.
        Session.objects.filter(pk=session.pk).delete()
        return session, events, out

    return render


# The same pages for a harmless session, rendered once (their structure does not change between tests).
_BASELINE: dict = {}


@pages
@pytest.mark.parametrize("payload", CORPUS, ids=IDS)
def test_pages_show_payload_as_text(pages_of, payload):
    if not _BASELINE:
        base_session, _, pages = pages_of(BENIGN)
        _BASELINE.update({name: (str(base_session.pk), collect(markup)) for name, markup in pages.items()})
    session, _, rendered = pages_of(payload)
    parsed = {name: collect(markup) for name, markup in rendered.items()}
    for name, markup in rendered.items():
        # Only the session's own file URLs are compared by prefix: the baseline's id does not matter.
        assert page_problems(parsed[name], _BASELINE[name][1], session) == [], f"{name}:\n{markup}"

    detail = squeeze(parsed["detail"].text)
    assert squeeze(payload.visible) in detail, "the task card does not show the payload as text"
    assert squeeze(storable(payload.text)[:200]) in detail, "the title (h1) does not show the payload as text"
    # The event partial: escaped places show the payload character for character.
    for where in ("detail", "push"):
        assert storable(payload.text).lstrip("\ufeff") in parsed[where].text, f"{where}: the payload is not in the page's text"
        assert storable(file_path_for(payload)) in parsed[where].text, f"{where}: the file name is not shown"
    assert squeeze(storable(payload.text)[:200]) in squeeze(parsed["list"].text)
    assert squeeze(storable(payload.text)[:200]) in squeeze(parsed["queue"].text)


@pages
def test_forms_refuse_nul_characters(client, alice):
    """Payloads with NUL cannot reach a page through a form: the new-session form refuses them."""
    client.force_login(alice)
    for payload in [p for p in CORPUS if p.nul]:
        response = client.post(reverse("sessions:new"), {"task": payload.text, "mode": "one_shot"})
        assert response.status_code == 400, payload.id
        assert "Null characters are not allowed." in response.content.decode()
    assert not Session.objects.exists()


@pages
@pytest.mark.parametrize(
    "injected",
    [
        "<script>xssHit('raw')</script>",
        "<img src=x onerror=xssHit('raw')>",
        "<p style=\"color:red\">styled</p>",
        "<iframe srcdoc=\"<b>x</b>\"></iframe>",
        "<div hx-get=\"/xss-beacon/raw\" hx-trigger=\"load\">x</div>",
        "<a href=\"javascript:xssHit('raw')\">x</a>",
        "<svg><a>x</a></svg>",
        "<div id=\"session-status\">x</div>",
    ],
)
def test_the_page_check_catches_unescaped_markup(pages_of, injected):
    """The check above is not blind: the harmless session page with raw markup spliced into its task card fails it."""
    session, _, rendered = pages_of(BENIGN)
    marker = '<div class="prose">'
    assert marker in rendered["detail"]
    poisoned = rendered["detail"].replace(marker, marker + injected, 1)
    assert page_problems(collect(poisoned), collect(rendered["detail"]), session) != []
