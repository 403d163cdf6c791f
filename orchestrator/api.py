"""A Python API for running the team without the web app.

    from orchestrator.api import copilot, continue_copilot
    result = copilot("Plot a damped cosine", max_rounds=4)
    if result.status == "paused":
        result = continue_copilot(result.session_id)

Sessions made here are ordinary sessions: stored in the database, visible in
the web app to their owner, and continued from any process (nothing is kept in
memory between calls). Each call runs the team in this process, through the
same worker code as the server.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

API_USERNAME = "api"


@dataclass(frozen=True)
class RunResult:
    session_id: UUID
    status: str
    events: int
    error: str = ""


def _setup() -> None:
    from django.apps import apps

    if not apps.ready:
        import django

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cmbagent_site.settings")
        django.setup()


def _owner(user=None):
    from django.contrib.auth import get_user_model

    if user is not None:
        return user
    User = get_user_model()
    return User.objects.filter(is_superuser=True).order_by("pk").first() or User.objects.get_or_create(username=API_USERNAME)[0]


def execute(session_id: UUID | str, *, observer: Callable | None = None) -> RunResult:
    """Claim the session's queued run and run it here to its end, pause or failure."""
    from orchestrator.worker import RunWorker
    from sessions import services
    from sessions.models import Run, Session

    run = Run.objects.filter(session_id=session_id, status=Run.Status.QUEUED).order_by("-number").first()
    if run is None:
        raise services.SessionError(f"Session {session_id} has no queued run.")
    worker = RunWorker(worker_id=f"api:{os.getpid()}")
    claimed = services.run_claim(worker_id=worker.worker_id, lease_seconds=worker.lease_seconds, run_id=run.pk)
    if claimed is None:
        raise services.SessionError(f"Another worker took run {run.number} of session {session_id}.")
    asyncio.run(worker.execute(claimed, observer=observer))
    session = Session.objects.get(pk=session_id)
    claimed.refresh_from_db()
    return RunResult(session_id=session.pk, status=session.status, events=session.last_seq, error=claimed.error)


def _start(task: str, *, mode: str, max_rounds: int | None, user=None) -> RunResult:
    _setup()
    from sessions import services

    config = {"max_turns": max_rounds} if max_rounds else {}
    session = services.session_start(owner=_owner(user), task=task, mode=mode, config=config)
    return execute(session.pk)


def copilot(task: str, *, max_rounds: int | None = None, user=None) -> RunResult:
    """copilot_control routes the request to a one-shot answer or to planning."""
    return _start(task, mode="copilot", max_rounds=max_rounds, user=user)


def full_swarm(task: str, *, max_rounds: int | None = None, user=None) -> RunResult:
    """Planning and control: plan, review, then each step by its agent."""
    return _start(task, mode="planning_and_control", max_rounds=max_rounds, user=user)


def quick_swarm(task: str, *, user=None) -> RunResult:
    """One shot: the engineer answers directly, the executor runs the code."""
    return _start(task, mode="one_shot", max_rounds=None, user=user)


def continue_copilot(session_id: UUID | str) -> RunResult:
    """Continue a paused session (any mode) with a fresh round budget, from its stored log."""
    _setup()
    from sessions import services
    from sessions.models import Session

    session = Session.objects.select_related("owner").get(pk=session_id)
    services.session_continue(session_id=session.pk, user=session.owner)
    return execute(session.pk)
