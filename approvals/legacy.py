"""Records from a CMBAgent database: import, migrate to current requests, resolve through the service.

See ../shared/reference/cmbagent-legacy-schema.md for the schema. Imported
rows are kept verbatim (LegacyApproval); sessions and their saved states
become Session and SessionState rows, with the same ids, so a second import
finds them and adds nothing.
"""
from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone as dt_timezone
from pathlib import Path
from typing import Any

from django.db import transaction
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest, LegacyApproval

REQUIRED = {
    "sessions": {"id", "name", "status"},
    "session_states": {"id", "session_id", "mode", "status"},
    "approval_requests": {"id", "run_id", "approval_type", "status"},
}
MODES = {
    "copilot": "copilot",
    "planning-control": "planning_and_control",
    "planning_and_control": "planning_and_control",
    "one-shot": "one_shot",
    "one_shot": "one_shot",
    "idea-generation": "idea_generation",
    "hitl-interactive": "hitl_both",
    "hitl-planning": "hitl_plan",
    "hitl-control": "hitl_steps",
}
STATE_STATUS = {"active": "suspended", "suspended": "suspended", "completed": "completed", "expired": "cancelled"}
KINDS = {
    "plan_approval": "plan", "after_planning": "plan",
    "step_approval": "step", "before_step": "step", "after_step": "step",
    "error_recovery": "error", "tool_call": "code",
}
LEGACY_STATUSES = {"pending", "approved", "rejected", "modified", "retry", "skip", "abort", "cancelled"}
NEWER_STATUSES = {"pending", "resolved", "expired", "cancelled"}
# A legacy resolution, as a decision of the current service, per kind.
DECISIONS = {
    "plan": {"approved": "approve", "rejected": "reject", "modified": "edit"},
    "step": {"approved": "continue", "rejected": "abort", "skip": "skip", "retry": "redo", "abort": "abort", "modified": "continue"},
    "error": {"approved": "retry", "retry": "retry", "skip": "skip", "abort": "abort", "rejected": "abort", "modified": "retry"},
    "code": {"approved": "allow", "rejected": "deny", "modified": "edit"},
}


class LegacyError(ValueError):
    """A file or record that cannot be imported, migrated or resolved; the message says why."""


@dataclass
class Report:
    imported: dict[str, int] = field(default_factory=lambda: {"sessions": 0, "session states": 0, "approval records": 0})
    already: dict[str, int] = field(default_factory=lambda: {"sessions": 0, "session states": 0, "approval records": 0})
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _json(value: Any, what: str, report: Report) -> Any:
    if value is None or isinstance(value, (dict, list)):
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        report.notes.append(f"{what}: not valid JSON, kept empty")
        return None


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt_timezone.utc)


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"cmbagent-legacy:{value}")


def open_database(path: str | Path) -> sqlite3.Connection:
    """The file, opened read-only, if it is a CMBAgent SQLite database; else LegacyError."""
    path = Path(path)
    if not path.is_file():
        raise LegacyError(f"{path} does not exist or is not a file.")
    with path.open("rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise LegacyError(f"{path} is not an SQLite database.")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        for table, columns in REQUIRED.items():
            found = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
            if not found:
                raise LegacyError(f"{path} is not a CMBAgent database: it has no {table} table.")
            missing = columns - found
            if missing:
                raise LegacyError(f"{path} is not a CMBAgent database: {table} lacks {', '.join(sorted(missing))}.")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LegacyError(f"{path} cannot be read as SQLite: {exc}") from exc
    except LegacyError:
        conn.close()
        raise
    return conn


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}


def import_database(path: str | Path, *, owner) -> Report:
    """Import sessions, session states and both generations of approval records; idempotent."""
    from sessions.models import Session, SessionState

    conn = open_database(path)
    report = Report()
    source = str(Path(path).resolve())
    try:
        states = {}
        for row in conn.execute("SELECT * FROM session_states"):
            states.setdefault(row["session_id"], row)  # one state per session (the first written)
        run_ids = {row[0] for row in conn.execute("SELECT id FROM workflow_runs")} if _columns(conn, "workflow_runs") else set()
        with transaction.atomic():
            for row in conn.execute("SELECT * FROM sessions"):
                sid = _uuid(row["id"])
                state = states.get(row["id"])
                raw_mode = state["mode"] if state else ""
                mode = MODES.get(raw_mode)
                if mode is None:
                    report.skipped.append(f"session {row['id']}: unknown mode {raw_mode!r}")
                    continue
                status = "cancelled" if row["status"] == "deleted" else STATE_STATUS.get(state["status"] if state else "", "")
                if not status:
                    report.skipped.append(f"session {row['id']}: unknown status {state['status']!r}")
                    continue
                meta = _json(row["meta"] if "meta" in row.keys() else None, f"session {row['id']} meta", report) or {}
                if Session.objects.filter(pk=sid).exists():
                    report.already["sessions"] += 1
                else:
                    Session.objects.create(
                        id=sid, owner=owner, title=(row["name"] or "Imported session")[:200],
                        task=str(meta.get("task") or row["name"] or "Imported from CMBAgent"), mode=mode, status=status,
                        config={"imported_from": source, "legacy_meta": meta if isinstance(meta, dict) else {}},
                    )
                    report.imported["sessions"] += 1
                if state is None:
                    continue
                if SessionState.objects.filter(session_id=sid).exclude(engine_state={}).exists():
                    report.already["session states"] += 1
                    continue
                history = _json(state["conversation_history"], f"state {state['id']} conversation_history", report) or []
                context = _json(state["context_variables"], f"state {state['id']} context_variables", report) or {}
                plan = _json(state["plan_data"], f"state {state['id']} plan_data", report)
                SessionState.objects.update_or_create(
                    session_id=sid,
                    defaults={
                        "conversation_history": history if isinstance(history, list) else [],
                        "context_variables": context if isinstance(context, dict) else {},
                        "plan": plan if isinstance(plan, list) else ((plan or {}).get("steps", []) if isinstance(plan, dict) else []),
                        "current_phase": (state["current_phase"] or "")[:40],
                        "current_step": state["current_step"] or 0,
                        "engine_state": {"imported_from": source, "legacy_status": state["status"], "legacy_version": state["version"]},
                    },
                )
                report.imported["session states"] += 1

            known_sessions = {str(pk) for pk in Session.objects.values_list("pk", flat=True)}
            for row in conn.execute("SELECT * FROM approval_requests"):
                keys = row.keys()
                if LegacyApproval.objects.filter(legacy_id=row["id"]).exists():
                    report.already["approval records"] += 1
                    continue
                generation = "legacy" if ("requested_at" in keys and row["requested_at"]) or ("context_snapshot" in keys and row["context_snapshot"]) else "newer"
                allowed = LEGACY_STATUSES if generation == "legacy" else NEWER_STATUSES
                if row["status"] not in allowed:
                    report.skipped.append(f"approval {row['id']}: unknown {generation} status {row['status']!r}")
                    continue
                if row["run_id"] and row["run_id"] not in run_ids:
                    report.notes.append(f"approval {row['id']}: its run {row['run_id']} does not exist (kept, unlinked)")
                legacy_session = row["session_id"] if "session_id" in keys else None
                session_pk = str(_uuid(legacy_session)) if legacy_session else None
                if legacy_session and session_pk not in known_sessions:
                    report.notes.append(f"approval {row['id']}: its session {legacy_session} was not imported (kept, unlinked)")
                    session_pk = None
                LegacyApproval.objects.create(
                    legacy_id=row["id"], generation=generation, run_id=row["run_id"] or "",
                    legacy_session_id=legacy_session or "", step_id=(row["step_id"] if "step_id" in keys else None) or "",
                    approval_type=row["approval_type"],
                    context=_json(row["context"] if "context" in keys else None, f"approval {row['id']} context", report),
                    status=row["status"], resolution=(row["resolution"] if "resolution" in keys else None) or "",
                    result=_json(row["result"] if "result" in keys else None, f"approval {row['id']} result", report),
                    created_at=_time(row["created_at"] if "created_at" in keys else None),
                    expires_at=_time(row["expires_at"] if "expires_at" in keys else None),
                    resolved_at=_time(row["resolved_at"] if "resolved_at" in keys else None),
                    requested_at=_time(row["requested_at"] if "requested_at" in keys else None),
                    context_snapshot=_json(row["context_snapshot"] if "context_snapshot" in keys else None, f"approval {row['id']} context_snapshot", report),
                    user_feedback=(row["user_feedback"] if "user_feedback" in keys else None) or "",
                    source_file=source, session_id=session_pk,
                )
                report.imported["approval records"] += 1
    finally:
        conn.close()
    other = sorted(
        name for (name,) in sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if name not in REQUIRED and not name.startswith("sqlite_")
    )
    if other:
        report.notes.append(f"tables not imported: {', '.join(other)}")
    return report


def _outcome(record: LegacyApproval) -> tuple[str, str, str, str]:
    """(status, decision, feedback, kind) of a legacy record in current terms."""
    kind = KINDS.get(record.approval_type, "")
    if not kind:
        raise LegacyError(f"approval type {record.approval_type!r} has no current equivalent")
    result = record.result if isinstance(record.result, dict) else {}
    if record.generation == "legacy":
        resolution, feedback = record.status, record.user_feedback
    else:
        resolution = record.resolution or result.get("resolution") or record.status
        feedback = str(result.get("feedback") or "")
    if record.status == "pending":
        return "pending", "", "", kind
    if record.status in ("cancelled",):
        return "cancelled", "", feedback, kind
    if record.status == "expired":
        return "expired", "", feedback, kind
    decision = DECISIONS[kind].get(resolution) if kind in DECISIONS else None
    if decision is None:
        raise LegacyError(f"resolution {resolution!r} has no current equivalent for a {kind} request")
    return "decided", decision, feedback, kind


def migrate(record: LegacyApproval) -> ApprovalRequest:
    """Make (once) the current request a legacy record stands for."""
    if record.migrated_to_id:
        return record.migrated_to
    if record.session_id is None:
        raise LegacyError("its session was not imported, so there is nothing to attach it to")
    status, decision, feedback, kind = _outcome(record)
    snapshot = record.context_snapshot if isinstance(record.context_snapshot, dict) else {}
    context = record.context if isinstance(record.context, dict) else {}
    question = str(snapshot.get("message") or context.get("message") or f"{record.approval_type.replace('_', ' ').capitalize()} (imported)")
    from orchestrator.engine.hitl import Request

    with transaction.atomic():
        request = ApprovalRequest.objects.create(
            session_id=record.session_id, event_seq=None, kind=kind, question=question[:5000],
            options=list(Request(kind).options), payload={"legacy": {"context": context, "context_snapshot": snapshot}},
            status=status, decision=decision, feedback=feedback,
            decided_at=record.resolved_at if status == "decided" else None,
            door="legacy_api" if status == "decided" else "",
            expires_at=record.expires_at if status == "pending" else None,
            audit=[{"at": timezone.now().isoformat(), "what": "migrated", "from": record.legacy_id}],
        )
        ApprovalRequest.objects.filter(pk=request.pk).update(created_at=record.created_at or request.created_at)
        record.migrated_to = request
        record.save(update_fields=["migrated_to"])
    return request


def resolve(record: LegacyApproval, *, user, decision: str, feedback: str = "", door: str = "admin") -> ApprovalRequest:
    """Decide a pending legacy record through the current service (migrating it first)."""
    request = migrate(record)
    return approvals.decide(request.pk, user=user, decision=decision, feedback=feedback, door=door)
