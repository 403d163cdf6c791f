"""Deciding approval requests from the session page and the staff queue."""
from __future__ import annotations

import logging
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from approvals import services as approvals
from approvals.forms import DecideForm
from approvals.models import ApprovalRequest, Door
from orchestrator.engine import hitl

logger = logging.getLogger(__name__)
AGES = {"1h": 3600, "1d": 86400, "7d": 7 * 86400}


def _refusal(request: HttpRequest, message: str, back: str, status: int = 200) -> HttpResponse:
    if request.htmx:
        return render(request, "sessions/action_error.html", {"message": message}, status=status)
    messages.error(request, message)
    return redirect(back)


@require_POST
@login_required
def decide(request: HttpRequest, request_id: UUID) -> HttpResponse:
    item = approvals.visible_to(request.user).select_related("session").filter(pk=request_id).first()
    if item is None:
        raise Http404("No such approval request.")
    form = DecideForm(request.POST)
    door = request.POST.get("door") or Door.SESSION_PAGE
    back = item.session.get_absolute_url() if door == Door.SESSION_PAGE else "approvals:queue"
    if not form.is_valid():
        problems = "; ".join(f"{name}: {' '.join(errors)}" for name, errors in form.errors.items())
        return _refusal(request, f"The answer was not understood ({problems}).", back, status=400)
    try:
        approvals.decide(
            item.pk,
            user=request.user,
            decision=form.cleaned_data["decision"],
            feedback=form.cleaned_data["feedback"],
            edits=form.edits(),
            # The staff queue is a door only for those who have it; anyone else decided on the session page.
            door=Door.STAFF_QUEUE
            if form.cleaned_data["door"] == Door.STAFF_QUEUE and request.user.has_perm("approvals.approvals")
            else Door.SESSION_PAGE,
        )
    except PermissionError:
        return _refusal(request, "You may not decide this request.", back, status=403)
    except approvals.ApprovalError as exc:
        return _refusal(request, str(exc), back)
    if request.htmx:
        return HttpResponse(status=204)  # the card leaves every page through the sockets
    return redirect(back)


KINDS = [str(kind) for kind in hitl.Request]


def pending_for(user, params) -> tuple:
    """Pending requests ``user`` may decide, filtered by ``params`` (kind, age, session); shared with the queue's socket."""
    pending = approvals.visible_to(user).filter(status=ApprovalRequest.Status.PENDING).select_related("session", "session__owner")
    kind = params.get("kind", "")
    if kind in KINDS:
        pending = pending.filter(kind=kind)
    age = params.get("age", "")
    if age in AGES:
        pending = pending.filter(created_at__gte=timezone.now() - timezone.timedelta(seconds=AGES[age]))
    session = (params.get("session", "") or "").strip()[:200]
    if session:
        pending = pending.filter(Q(session__title__icontains=session) | Q(session__task__icontains=session))
    return pending, {"kind": kind if kind in KINDS else "", "age": age if age in AGES else "", "session_filter": session}


@require_GET
@login_required
def queue(request: HttpRequest) -> HttpResponse:
    """Pending requests the user may decide, newest first, filtered by kind, age and session."""
    if not request.user.has_perm("approvals.approvals"):
        raise Http404("No such page.")
    pending, filters = pending_for(request.user, request.GET)
    page = Paginator(pending.order_by("-created_at"), 25).get_page(request.GET.get("page"))
    context = {"page": page, **filters, "kinds": KINDS, "query": request.GET.urlencode()}
    template = "approvals/queue.html#rows" if request.htmx and request.headers.get("HX-Target") == "approval-rows" else "approvals/queue.html"
    return render(request, template, context)
