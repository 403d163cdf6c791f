"""Reads shared by views and sockets."""
from __future__ import annotations

from uuid import UUID

from django.db.models import Q, QuerySet, Sum

from orchestrator.engine.events import EngineEvent, EventKind
from sessions.models import Event, Session


def sessions_of(user) -> QuerySet[Session]:
    return Session.objects.filter(owner=user)


def session_for_user(session_id: UUID | str, user) -> Session | None:
    """The session if ``user`` may see it, else None (missing and forbidden look alike)."""
    if not getattr(user, "is_authenticated", False):
        return None
    return Session.objects.filter(pk=session_id, owner=user).select_related("state").first()


def events_after(session_id: UUID | str, after: int, *, limit: int = 500) -> list[Event]:
    return list(Event.objects.filter(session_id=session_id, seq__gt=after).order_by("seq")[:limit])


def transcript(session_id: UUID | str) -> list[Event]:
    return list(Event.objects.filter(session_id=session_id).order_by("seq"))


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


def usage_by_agent(session_id: UUID | str) -> list[dict]:
    """Tokens and cost per agent, most expensive first."""
    return list(
        Event.objects.filter(session_id=session_id)
        .exclude(agent="")
        .values("agent")
        .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), cost=Sum("cost_usd"))
        .filter(Q(prompt__gt=0) | Q(completion__gt=0))
        .order_by("-cost", "-prompt", "agent")
    )
