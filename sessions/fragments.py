"""HTML fragments pushed to session pages, rendered from rows by the page's own partials."""
from __future__ import annotations

from collections.abc import Sequence

from django.template.loader import render_to_string

from sessions.models import Event, Session

# A fragment larger than this is not carried in a channel-layer note; sockets
# read the rows instead (the layer has message size limits).
NOTE_HTML_LIMIT = 32 * 1024


def render_push(session: Session, events: Sequence[Event]) -> str:
    """Transcript rows to append, plus the status, totals and pending approval cards as they are now."""
    return render_to_string(
        "sessions/push.html", {"events": events, "session": session, "pending_approvals": pending_approvals(session)}
    )


def pending_approvals(session: Session):
    from approvals.models import ApprovalRequest

    return list(ApprovalRequest.objects.filter(session=session, status=ApprovalRequest.Status.PENDING).order_by("created_at"))
