"""HTML fragments pushed to session pages, rendered from rows by the page's own partials."""
from __future__ import annotations

from collections.abc import Sequence

from django.template.loader import render_to_string

from sessions.models import Event, Session

# A fragment larger than this is not carried in a channel-layer note; sockets
# read the rows instead (the layer has message size limits).
NOTE_HTML_LIMIT = 32 * 1024


# The events after which the set of pending approval cards may have changed: a request asked,
# a decision recorded, or a status (a decision queues the next run; cancelling withdraws requests).
CARD_KINDS = {"approval", "decision", "status"}


def render_push(session: Session, events: Sequence[Event]) -> str:
    """Transcript rows to append, plus the status and totals as they are now, and the pending approval
    cards when they may have changed (read only then: most events are messages)."""
    cards = any(event.kind in CARD_KINDS for event in events)
    context = {"events": events, "session": session, "cards": cards, "pending_approvals": pending_approvals(session) if cards else []}
    return render_to_string("sessions/push.html", context)


def pending_approvals(session: Session):
    from approvals.models import ApprovalRequest

    return list(ApprovalRequest.objects.filter(session=session, status=ApprovalRequest.Status.PENDING).order_by("created_at"))
