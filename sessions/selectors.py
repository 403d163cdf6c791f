"""Reads shared by views and sockets."""
from __future__ import annotations

from uuid import UUID

from django.db.models import QuerySet

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
