from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlencode
from uuid import UUID

from django.conf import settings

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.contrib import messages
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from sessions import export, selectors, services
from sessions.forms import SessionFilterForm, SessionForm
from sessions.fragments import pending_approvals
from sessions.models import Session

logger = logging.getLogger(__name__)


def _model_notice() -> dict:
    """What the new-session form says of the model the team will run on: its label, and why it cannot be
    used if it cannot (checked as a run checks it, without reaching the network)."""
    from orchestrator.engine.models import ModelConfig, ModelConfigError, client_factory

    try:
        config = ModelConfig.from_env()
    except ModelConfigError as exc:
        return {"label": "", "offline": False, "problem": str(exc)}
    try:
        client_factory(config)
    except ModelConfigError as exc:
        return {"label": config.label, "offline": False, "problem": str(exc)}
    return {"label": config.label, "offline": config.provider == "offline", "problem": ""}


def _owned_session(request: HttpRequest, session_id: UUID) -> Session:
    """The session, if the user owns it: only its owner controls it."""
    session = selectors.session_for_user(session_id, request.user)
    if session is None:
        # Someone else's session looks exactly like a missing one.
        raise Http404("No such session.")
    return session


def _watched_session(request: HttpRequest, session_id: UUID) -> Session:
    """The session, if the user may see it: its owner, or staff who decide its approval requests."""
    session = selectors.session_for_viewer(session_id, request.user)
    if session is None:
        raise Http404("No such session.")
    return session


@require_GET
@login_required
def session_list(request: HttpRequest) -> HttpResponse:
    form = SessionFilterForm(request.GET or None)
    filters = form.cleaned_data if form.is_valid() else {}
    sessions = selectors.sessions_of(
        request.user, status=filters.get("status", ""), mode=filters.get("mode", ""), search=filters.get("q", "")
    )
    page = Paginator(sessions, 25).get_page(request.GET.get("page"))
    query = {k: v for k, v in filters.items() if v}
    context = {"page": page, "form": form, "query": urlencode(query), "filtered": bool(query)}
    template = "sessions/list.html#rows" if request.htmx and request.headers.get("HX-Target") == "session-rows" else "sessions/list.html"
    return render(request, template, context)


@require_http_methods(["GET", "POST"])
@login_required
def session_new(request: HttpRequest) -> HttpResponse:
    form = SessionForm(request.POST or None)
    if request.method == "POST":
        if form.is_valid():
            try:
                session = services.session_start(owner=request.user, **form.session_kwargs())
            except services.SessionError as exc:
                form.add_error(None, str(exc))
            else:
                return redirect(session)
        logger.info("new session refused for user %s: %s", request.user.pk, form.errors.as_json())
    return render(request, "sessions/new.html", {"form": form, "model": _model_notice()}, status=400 if form.errors else 200)


@require_GET
@login_required
def session_detail(request: HttpRequest, session_id: UUID) -> HttpResponse:
    session = _watched_session(request, session_id)
    # The latest window only: a session of 10,000 events opens as fast as one of 100; older ones load on scroll.
    events = selectors.transcript_window(session.pk, limit=settings.TRANSCRIPT_WINDOW)
    return render(
        request,
        "sessions/detail.html",
        {
            "session": session,
            "events": events,
            "first_seq": events[0].seq if events else 1,
            "last_seq": events[-1].seq if events else 0,
            "pending_approvals": pending_approvals(session),
            "watching": session.owner_id != request.user.pk,  # staff, deciding for someone else's session
        },
    )


@require_GET
@login_required
def session_events(request: HttpRequest, session_id: UUID) -> HttpResponse:
    """Older transcript events, a window at a time, before seq ``before`` (with the loader for the next ones)."""
    session = _watched_session(request, session_id)
    try:
        before = int(request.GET.get("before", ""))
    except ValueError:
        return HttpResponse("Say which events: ?before=<seq>, a whole number.", status=400, content_type="text/plain")
    before = max(1, min(before, session.last_seq + 1))
    events = selectors.transcript_window(session.pk, before=before, limit=settings.TRANSCRIPT_WINDOW)
    return render(
        request,
        "sessions/older.html",
        {"session": session, "events": events, "first_seq": events[0].seq if events else 1},
    )


# Served inline; anything else (including SVG, which can carry script) is a download.
INLINE_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}


@require_GET
@login_required
def session_file(request: HttpRequest, session_id: UUID, path: str) -> FileResponse:
    """A file written by the session's code, for whoever may see the session."""
    session = _watched_session(request, session_id)
    root = (Path(settings.RUNS_DIR) / str(session.pk)).resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or ".code" in target.relative_to(root).parts or not target.is_file():
        raise Http404("No such file.")
    content_type = INLINE_IMAGE_TYPES.get(target.suffix.lower())
    response = FileResponse(
        target.open("rb"),
        as_attachment=content_type is None,
        filename=target.name,
        content_type=content_type or "application/octet-stream",
    )
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


EXPORTS = {
    "md": (export.as_markdown, "text/markdown; charset=utf-8"),
    "json": (export.as_json, "application/json"),
}


@require_GET
@login_required
def session_export(request: HttpRequest, session_id: UUID, fmt: str) -> StreamingHttpResponse:
    """The whole transcript as a download, streamed."""
    session = _watched_session(request, session_id)
    if fmt not in EXPORTS:
        raise Http404("No such format.")
    render, content_type = EXPORTS[fmt]
    response = StreamingHttpResponse(render(session), content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="session-{session.pk}.{fmt}"'
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["X-Content-Type-Options"] = "nosniff"
    return response


# The controls of a session's lifecycle: each a POST, each a service call.
ACTIONS = {
    "continue": services.session_continue,
    "suspend": services.session_suspend,
    "resume": services.session_resume,
    "retry": services.session_retry,
    "cancel": services.session_cancel,
}


@require_POST
@login_required
def session_action(request: HttpRequest, session_id: UUID, action: str) -> HttpResponse:
    """Continue, Suspend, Resume, Retry or Cancel; a refusal says why and changes nothing."""
    if action not in ACTIONS:
        raise Http404("No such action.")
    _owned_session(request, session_id)
    try:
        ACTIONS[action](session_id=session_id, user=request.user)
    except services.SessionError as exc:
        logger.info("%s refused for session %s: %s", action, session_id, exc)
        if request.htmx:
            return render(request, "sessions/action_error.html", {"message": str(exc)})
        messages.error(request, str(exc))
    if request.htmx:
        return HttpResponse(status=204)  # the socket pushes the new status
    return redirect("sessions:detail", session_id=session_id)
