"""The one approval service: request, decide, expire, cancel.

A request is recorded in the same transaction as the engine's approval event.
Deciding is a conditional update (``status = pending``): of any number of
simultaneous deciders exactly one changes the row, and the others are told
who decided, how and when. The winning decision queues the run that applies
it (``sessions.services``), so the session goes on whichever process, server
or machine picks that run up, also after a restart.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from approvals.models import ApprovalRequest, Door
from orchestrator.engine import hitl
from orchestrator.engine.events import EngineEvent, EventKind

logger = logging.getLogger(__name__)

QUEUE_GROUP = "approvals"  # the staff queue's live group
EXPIRY_POLICIES = ("reject", "approve", "pending")
# What "reject" means for each kind of request when a timeout policy applies it.
REJECTING = {"plan": "reject", "step": "abort", "code": "deny", "error": "abort", "copilot_turn": "finish", "budget": "stop"}


class ApprovalError(ValueError):
    """A decision that cannot be taken; the message says why."""


class AlreadyDecided(ApprovalError):
    """Someone else decided first; the message says who, how and when."""


def may_decide(user, request: ApprovalRequest) -> bool:
    """Staff with the approvals permission decide anything; an owner, their session's requests if its policy allows."""
    if not getattr(user, "is_authenticated", False):
        return False
    if user.is_active and user.has_perm("approvals.approvals"):
        return True
    owner_decides = request.session.config.get("owner_decides", True)
    return request.session.owner_id == user.pk and owner_decides


def visible_to(user):
    """The requests ``user`` may see."""
    if not getattr(user, "is_authenticated", False):
        return ApprovalRequest.objects.none()
    if user.is_active and user.has_perm("approvals.approvals"):
        return ApprovalRequest.objects.all()
    return ApprovalRequest.objects.filter(session__owner=user)


def as_event(request: ApprovalRequest) -> EngineEvent:
    return EngineEvent(EventKind.APPROVAL, content=request.question, data={**request.payload, "request": request.kind, "options": request.options})


def record_request(row) -> ApprovalRequest:
    """Record the request an approval event asks (called in the event's own transaction)."""
    data = dict(row.data)
    timeout = int(settings.APPROVAL_TIMEOUT_SECONDS or 0)
    request = ApprovalRequest.objects.create(
        session_id=row.session_id,
        event_seq=row.seq,
        kind=data.pop("request", ""),
        options=data.pop("options", []),
        question=row.content,
        payload=data,
        expires_at=timezone.now() + timedelta(seconds=timeout) if timeout else None,
    )
    transaction.on_commit(lambda: _announce(request, "new"))
    return request


def _announce(request: ApprovalRequest, change: str) -> None:
    from sessions.services import _send

    _send("group", QUEUE_GROUP, {"type": "approvals.changed", "id": str(request.pk), "change": change})


def decide(
    request_id: UUID | str,
    *,
    user,
    decision: str,
    feedback: str = "",
    edits: dict[str, Any] | None = None,
    door: str = Door.SESSION_PAGE,
) -> ApprovalRequest:
    """Decide a pending request; exactly one of any number of concurrent deciders wins.

    Raises :class:`ApprovalError` for a decision that does not fit (nothing
    written), :class:`AlreadyDecided` when someone was first, and
    ``PermissionError`` when ``user`` may not decide it.
    """
    from sessions import services as session_services

    request = ApprovalRequest.objects.select_related("session").filter(pk=request_id).first()
    if request is None:
        raise ApprovalError("No such approval request.")
    if user is not None and not may_decide(user, request):
        raise PermissionError("You may not decide this request.")
    if request.status != ApprovalRequest.Status.PENDING:
        raise AlreadyDecided(_decided_text(request))
    try:
        answer = hitl.validate(as_event(request), hitl.Answer(decision, feedback or "", edits or {}))
    except hitl.AnswerError as exc:
        raise ApprovalError(str(exc)) from exc
    by = user.get_username() if user is not None else "timeout policy"
    now = timezone.now()
    with transaction.atomic():
        won = ApprovalRequest.objects.filter(pk=request.pk, status=ApprovalRequest.Status.PENDING).update(
            status=ApprovalRequest.Status.DECIDED if door != Door.TIMEOUT_POLICY else ApprovalRequest.Status.EXPIRED,
            decision=answer.decision,
            feedback=answer.feedback,
            edits=answer.edits,
            decided_by=user,
            decided_at=now,
            door=door,
        )
        if not won:
            request.refresh_from_db()
            raise AlreadyDecided(_decided_text(request))
        # A request migrated from a legacy record has no run waiting on it: the decision is the record.
        if request.event_seq is not None:
            try:
                session_services.queue_answer(
                    request.session_id,
                    hitl.Answer(answer.decision, answer.feedback, answer.edits, by=by),
                    request_id=str(request.pk),
                    door=str(door),
                )
            except session_services.SessionError as exc:
                raise ApprovalError(str(exc)) from exc
    request.refresh_from_db()
    transaction.on_commit(lambda: _announce(request, "decided"))
    logger.info("approval %s (%s) decided %s by %s via %s", request.pk, request.kind, answer.decision, by, door)
    return request


def _decided_text(request: ApprovalRequest) -> str:
    if request.status == ApprovalRequest.Status.CANCELLED:
        return "This request was cancelled."
    who = request.decided_by.get_username() if request.decided_by else "the timeout policy"
    when = timezone.localtime(request.decided_at).strftime("%Y-%m-%d %H:%M:%S") if request.decided_at else "earlier"
    door = request.get_door_display().lower() if request.door else "an unknown door"
    return f"Already decided: {request.decision or request.status} by {who} via the {door} at {when}."


def cancel(request_id: UUID | str, *, reason: str) -> bool:
    """Withdraw a pending request (its session was cancelled); False if it was no longer pending."""
    with transaction.atomic():
        request = ApprovalRequest.objects.select_for_update().filter(pk=request_id).first()
        if request is None or request.status != ApprovalRequest.Status.PENDING:
            return False
        request.status = ApprovalRequest.Status.CANCELLED
        request.audit = [*request.audit, {"at": timezone.now().isoformat(), "what": "cancelled", "why": reason}]
        request.save(update_fields=["status", "audit"])
    transaction.on_commit(lambda: _announce(request, "decided"))
    return True


def cancel_pending_of(session_id: UUID | str, *, reason: str) -> int:
    ids = list(ApprovalRequest.objects.filter(session_id=session_id, status=ApprovalRequest.Status.PENDING).values_list("pk", flat=True))
    return sum(cancel(pk, reason=reason) for pk in ids)


def expire(request_id: UUID | str, *, policy: str | None = None) -> str:
    """Apply the expiry policy to a pending request and record that it did; returns what happened."""
    policy = policy or settings.APPROVAL_EXPIRY_POLICY
    if policy not in EXPIRY_POLICIES:
        raise ApprovalError(f"Unknown expiry policy {policy!r}; use one of: {', '.join(EXPIRY_POLICIES)}.")
    request = ApprovalRequest.objects.filter(pk=request_id).first()
    if request is None or request.status != ApprovalRequest.Status.PENDING:
        return "not pending"
    if policy == "pending":
        with transaction.atomic():
            locked = ApprovalRequest.objects.select_for_update().get(pk=request.pk)
            locked.audit = [*locked.audit, {"at": timezone.now().isoformat(), "what": "expired", "policy": "left pending"}]
            locked.expires_at = None
            locked.save(update_fields=["audit", "expires_at"])
        return "left pending"
    kind = hitl.Request(request.kind)
    decision = kind.default if policy == "approve" else REJECTING[request.kind]
    feedback = "No one answered in time; the timeout policy decided." if decision in ("reject", "reply") else ""
    try:
        decide(request.pk, user=None, decision=decision, feedback=feedback, door=Door.TIMEOUT_POLICY)
    except AlreadyDecided:
        return "not pending"
    return decision


def expire_due(now=None) -> int:
    """Expire every pending request past its ``expires_at``."""
    now = now or timezone.now()
    due = ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING, expires_at__lt=now).values_list("pk", flat=True)
    return sum(expire(pk) != "not pending" for pk in list(due))
