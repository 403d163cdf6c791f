"""Reads shared by views and sockets."""
from __future__ import annotations

from uuid import UUID

from django.db.models import Q, QuerySet

from orchestrator.engine.events import EngineEvent, EventKind
from sessions.models import Event, Session


def sessions_of(user, *, status: str = "", mode: str = "", search: str = "") -> QuerySet[Session]:
    """A user's sessions, newest first, optionally of one status and mode, and matching ``search`` in task or title."""
    sessions = Session.objects.filter(owner=user)
    if status:
        sessions = sessions.filter(status=status)
    if mode:
        sessions = sessions.filter(mode=mode)
    for word in search.split()[:8]:
        sessions = sessions.filter(Q(task__icontains=word) | Q(title__icontains=word))
    return sessions


def session_for_user(session_id: UUID | str, user) -> Session | None:
    """The session if ``user`` owns it, else None (missing and forbidden look alike): who may control it."""
    if not getattr(user, "is_authenticated", False):
        return None
    return Session.objects.filter(pk=session_id, owner=user).select_related("state").first()


def may_watch_every_session(user) -> bool:
    """Staff who decide the approval requests of every session also see the sessions they decide for."""
    return bool(getattr(user, "is_authenticated", False) and user.is_active and user.has_perm("approvals.approvals"))


def session_for_viewer(session_id: UUID | str, user) -> Session | None:
    """The session if ``user`` may see it (its owner, or staff with the approvals permission), else None."""
    session = Session.objects.filter(pk=session_id).select_related("state", "owner").first()
    if session is None or not getattr(user, "is_authenticated", False):
        return None
    if session.owner_id == user.pk or may_watch_every_session(user):
        return session
    return None


def events_after(session_id: UUID | str, after: int, *, limit: int = 500) -> list[Event]:
    return list(Event.objects.filter(session_id=session_id, seq__gt=after).order_by("seq")[:limit])


def transcript(session_id: UUID | str) -> list[Event]:
    return list(Event.objects.filter(session_id=session_id).order_by("seq"))


def transcript_window(session_id: UUID | str, *, before: int | None = None, limit: int = 200) -> list[Event]:
    """The newest ``limit`` events (before seq ``before``, if given), oldest first: one index range scan."""
    rows = Event.objects.filter(session_id=session_id)
    if before is not None:
        rows = rows.filter(seq__lt=before)
    return list(rows.order_by("-seq")[:limit])[::-1]


def engine_history(session_id: UUID | str) -> list[EngineEvent]:
    """The session's log as engine events, for continuing a run."""
    return [
        EngineEvent(
            kind=EventKind(row.kind),
            agent=row.agent,
            content=row.content,
            data=row.data,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cost_usd=float(row.cost_usd),
        )
        for row in Event.objects.filter(session_id=session_id).order_by("seq")
    ]
