"""A session's transcript as Markdown or JSON, streamed row by row (a 10,000-event session is not held in memory)."""
from __future__ import annotations

import json
from collections.abc import Iterator

from django.core.serializers.json import DjangoJSONEncoder

from sessions.models import Event, Session

CHUNK = 500


def _rows(session: Session) -> Iterator[Event]:
    return Event.objects.filter(session=session).order_by("seq").iterator(chunk_size=CHUNK)


def _meta(session: Session) -> dict:
    return {
        "id": str(session.pk),
        "title": session.title,
        "task": session.task,
        "mode": session.mode,
        "model_provider": session.model_provider,
        "status": session.status,
        "config": session.config,
        "events": session.last_seq,
        "prompt_tokens": session.prompt_tokens,
        "completion_tokens": session.completion_tokens,
        "cost_usd": str(session.cost_usd),
        "usage": session.usage,
        "created_at": session.created_at.isoformat(),
        "updated_at": session.updated_at.isoformat(),
    }


def as_json(session: Session) -> Iterator[str]:
    """``{"session": {...}, "events": [...]}``: every event with its seq, kind, agent, content, data and usage."""
    yield '{"session": ' + json.dumps(_meta(session), cls=DjangoJSONEncoder) + ', "events": ['
    for i, row in enumerate(_rows(session)):
        event = {
            "seq": row.seq,
            "kind": row.kind,
            "agent": row.agent,
            "content": row.content,
            "data": row.data,
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "cost_usd": str(row.cost_usd),
            "created_at": row.created_at.isoformat(),
        }
        yield ("," if i else "") + "\n" + json.dumps(event, cls=DjangoJSONEncoder)
    yield "\n]}\n"


def _fence(text: str, lang: str = "") -> str:
    """A code fence longer than any backtick run inside ``text``, so agent output cannot close it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}\n"


def _event_markdown(row: Event) -> str:
    kind, data = row.kind, row.data or {}
    if kind == "message":
        return f"### {row.agent}\n\n{row.content}\n"
    if kind == "task":
        return f"### Task\n\n{row.content}\n"
    if kind == "tool_call":
        calls = "".join(_fence(str(call.get("arguments", "")), "json") for call in data.get("calls", []))
        return f"**{row.agent}** calls `{row.content}`\n\n{calls}"
    if kind == "tool_result":
        return f"Output of `{data.get('name', '')}`{' (error)' if data.get('is_error') else ''}:\n\n{_fence(row.content)}"
    if kind in ("handoff", "phase"):
        return f"---\n\n*{row.agent} → {row.content}*\n" if kind == "handoff" else f"---\n\n**Phase: {row.content}**\n"
    if kind == "plan":
        steps = "\n".join(f"{s.get('number')}. [{s.get('agent')}] {s.get('description')}" for s in data.get("steps", []))
        return f"### Plan ({row.content})\n\n{steps}\n"
    if kind == "step":
        return f"**Step {data.get('step')} of {data.get('of')}**\n"
    if kind == "artifact":
        return f"File: `{data.get('path', '')}` ({data.get('kind', '')}, {data.get('size', 0)} bytes)\n"
    if kind == "approval":
        return f"**Approval requested ({data.get('request', '')}):** {row.content}\n\nAnswers: {', '.join(data.get('options', []))}\n"
    if kind == "decision":
        said = f"\n\n> {data['feedback']}" if data.get("feedback") else ""
        return f"**Decision: {data.get('decision', '')}** by {data.get('by') or 'a person'} on the {data.get('request', '')} request{said}\n"
    if kind == "error":
        return f"**Error:** {row.content}\n"
    if kind == "status":
        return f"*Status: {data.get('status', '')}* {row.content}\n"
    return f"*{kind}:* {row.content}\n"


def as_markdown(session: Session) -> Iterator[str]:
    yield f"# {session.title}\n\n"
    yield (
        f"- Session: {session.pk}\n- Mode: {session.get_mode_display()}\n- Model: {session.model_provider}\n"
        f"- Status: {session.get_status_display()}\n- Events: {session.last_seq}\n"
        f"- Tokens: {session.prompt_tokens} prompt + {session.completion_tokens} completion\n"
        f"- Cost: ${session.cost_usd}\n- Started: {session.created_at.isoformat()}\n\n"
    )
    yield "## Task\n\n" + session.task + "\n\n## Transcript\n\n"
    for row in _rows(session):
        yield f"#### {row.seq} · {row.kind}\n\n" + _event_markdown(row) + "\n"
