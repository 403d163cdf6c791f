"""A session waiting for a person, made through the same services the worker uses."""
from __future__ import annotations

from orchestrator.engine.events import EngineEvent, EventKind
from sessions import services


def waiting_session(owner, *, kind="plan", config=None, finish=True):
    """A session whose run asked a person (``finish=False``: the run that asked is still ending)."""
    session = services.session_start(owner=owner, task="Plot a damped cosine", mode="hitl_plan", config=config or {})
    run = services.run_claim(worker_id="w-helper", lease_seconds=30, run_id=session.runs.get().pk)
    options = {
        "plan": ["approve", "reject", "edit"],
        "step": ["continue", "skip", "redo", "abort"],
        "code": ["allow", "allow_session", "deny", "edit"],
        "budget": ["continue", "stop"],
        "copilot_turn": ["reply", "finish"],
    }[kind]
    data = {"request": kind, "options": options, "plan": [{"number": 1, "agent": "engineer", "description": "Plot it", "status": "pending"}]}
    services.event_append(
        session_id=session.pk, run_id=run.pk, event=EngineEvent(EventKind.APPROVAL, agent="plan_reviewer", content="Approve the plan?", data=data),
        checkpoint={}, worker_id=run.lease_owner,
    )
    if finish:
        status = "paused" if kind == "budget" else "waiting_approval"  # a spent budget pauses the session
        services.run_finish(run_id=run.pk, worker_id=run.lease_owner, status=status, detail="waiting")
    session.refresh_from_db()
    return session
