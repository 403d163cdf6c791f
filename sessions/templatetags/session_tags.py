from __future__ import annotations

import json

from django import template
from django.utils.safestring import SafeString

from sessions.rendering import highlight_code, render_markdown

register = template.Library()


@register.filter
def markdown(text: str) -> SafeString:
    """Render untrusted markdown to sanitised HTML."""
    return render_markdown(text)


@register.filter
def code(text: str, lang: str = "python") -> SafeString:
    return highlight_code(text, lang)


@register.filter
def call_code(arguments: str) -> str:
    """The ``code`` argument of an execute_code call, or the raw arguments."""
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        return str(arguments)
    if isinstance(value, dict) and isinstance(value.get("code"), str):
        return value["code"]
    return json.dumps(value, indent=2)


@register.filter
def option_label(option: str) -> str:
    """The button text of an approval answer."""
    from orchestrator.engine.hitl import OPTION_LABELS

    return OPTION_LABELS.get(option, option.replace("_", " ").capitalize())


@register.filter
def option_labels(options) -> str:
    """The button texts of an approval's answers, in a line: "Send, Finish"."""
    return ", ".join(option_label(str(option)) for option in options or ())


@register.filter
def words(name) -> str:
    """A code name as words: copilot_turn -> copilot turn."""
    return str(name or "").replace("_", " ")


@register.filter
def offered(actions, pending_approvals) -> list:
    """The session's lifecycle controls, less Continue while a round-budget card asks the same (with Stop beside it)."""
    if any(request.kind == "budget" for request in pending_approvals or ()):
        return [action for action in actions if action[0] != "continue"]
    return list(actions)


@register.filter
def steps_done(plan) -> int:
    """Steps behind the run: done or skipped (the progress bar's value)."""
    return sum(1 for step in plan or () if isinstance(step, dict) and step.get("status") in ("done", "skipped"))


@register.filter
def steps_completed(plan) -> int:
    return sum(1 for step in plan or () if isinstance(step, dict) and step.get("status") == "done")


@register.filter
def steps_skipped(plan) -> int:
    return sum(1 for step in plan or () if isinstance(step, dict) and step.get("status") == "skipped")


@register.filter
def status_label(status) -> str:
    """A session status as the badges say it (waiting_approval -> Waiting for approval)."""
    from sessions.models import Session

    try:
        return Session.Status(status).label
    except ValueError:
        return words(status)


@register.filter
def elapsed(session) -> str:
    """Time since the session started; for a finished one, until its last change (a live page ticks it on)."""
    from django.utils import timezone

    end = timezone.now() if session.is_live else session.updated_at
    seconds = max(0, int((end - session.created_at).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
