"""Importing a CMBAgent database: both generations, idempotent, bad rows reported, bad files refused."""
from __future__ import annotations

import json
import sqlite3
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from approvals import legacy
from approvals.models import ApprovalRequest, LegacyApproval
from sessions.models import Session, SessionState

pytestmark = pytest.mark.django_db
S1 = "11111111-1111-4111-8111-111111111111"
S2 = "22222222-2222-4222-8222-222222222222"


def _legacy_db(path):
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE sessions (id TEXT PRIMARY KEY, user_id TEXT, name TEXT, created_at TEXT, last_active_at TEXT,
                               status TEXT, meta TEXT, resource_limits TEXT);
        CREATE TABLE session_states (id TEXT PRIMARY KEY, session_id TEXT, mode TEXT, conversation_history TEXT,
                                     context_variables TEXT, plan_data TEXT, current_phase TEXT, current_step INTEGER,
                                     status TEXT, created_at TEXT, updated_at TEXT, expires_at TEXT, version INTEGER);
        CREATE TABLE workflow_runs (id TEXT PRIMARY KEY, session_id TEXT, mode TEXT, status TEXT);
        CREATE TABLE approval_requests (id TEXT PRIMARY KEY, run_id TEXT, session_id TEXT, step_id TEXT,
                                        approval_type TEXT, context TEXT, status TEXT, resolution TEXT, result TEXT,
                                        created_at TEXT, expires_at TEXT, resolved_at TEXT, requested_at TEXT,
                                        context_snapshot TEXT, user_feedback TEXT);
        CREATE TABLE cost_records (id TEXT);
        """
    )
    conn.execute("INSERT INTO sessions VALUES (?, NULL, 'CMB lensing', '2025-01-02T03:04:05', NULL, 'active', ?, NULL)", (S1, json.dumps({"task": "Estimate lensing"})))
    conn.execute("INSERT INTO sessions VALUES (?, NULL, 'Odd one', '2025-01-02', NULL, 'active', 'null', NULL)", (S2,))
    conn.execute(
        "INSERT INTO session_states VALUES ('st1', ?, 'planning-control', ?, ?, ?, 'execution', 2, 'suspended', '2025-01-02T03:04:05+00:00', NULL, NULL, 3)",
        (S1, json.dumps([{"role": "user", "content": "Estimate lensing"}]), json.dumps({"k": 1}), json.dumps({"steps": [{"n": 1}]})),
    )
    conn.execute("INSERT INTO session_states VALUES ('st2', ?, 'telepathy', 'not json', NULL, NULL, NULL, NULL, 'active', NULL, NULL, NULL, 1)", (S2,))
    conn.execute("INSERT INTO workflow_runs VALUES ('run1', ?, 'planning-control', 'paused')", (S1,))
    rows = [
        # old writer: status is the resolution; feedback in user_feedback
        ("a-old", "run1", S1, None, "plan_approval", None, "rejected", "rejected", None, "2025-01-02T03:05:00", None, "2025-01-02T03:06:00",
         "2025-01-02T03:05:00", json.dumps({"message": "Approve the plan?", "options": ["approve", "reject"]}), "Add a null test"),
        # newer writer, resolved, with a dangling run id and a tz-less timestamp
        ("a-new", "ghost-run", S1, None, "after_step", json.dumps({"step": 2}), "resolved", "approved",
         json.dumps({"resolution": "approved", "feedback": "fine", "modifications": None}), "2025-01-02 03:07:00", "2025-01-02T03:12:00+00:00",
         "2025-01-02T03:08:00+00:00", None, None, None),
        ("a-pending", "run1", S1, None, "tool_call", "null", "pending", None, None, "2025-01-02T03:09:00+00:00", "2025-01-02T04:09:00+00:00", None, None, None, None),
        ("a-weird", "run1", S1, None, "plan_approval", "{broken", "exploded", None, None, None, None, None, None, None, None),
    ]
    conn.executemany("INSERT INTO approval_requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.commit()
    conn.close()
    return path


def test_import_brings_sessions_states_and_both_generations(tmp_path, alice):
    path = _legacy_db(tmp_path / "cmbagent.db")
    out = StringIO()
    call_command("import_cmbagent_db", str(path), "--owner", "alice", stdout=out)
    text = out.getvalue()
    session = Session.objects.get(pk=S1)
    assert session.owner == alice and session.mode == "planning_and_control" and session.status == "suspended"
    assert session.task == "Estimate lensing"
    state = SessionState.objects.get(session=session)
    assert state.conversation_history[0]["content"] == "Estimate lensing" and state.current_step == 2 and state.plan == [{"n": 1}]
    records = {r.legacy_id: r for r in LegacyApproval.objects.all()}
    assert set(records) == {"a-old", "a-new", "a-pending"}
    assert records["a-old"].generation == "legacy" and records["a-old"].user_feedback == "Add a null test"
    assert records["a-new"].generation == "newer" and records["a-new"].result["feedback"] == "fine"
    assert records["a-new"].created_at.tzinfo is not None
    assert "imported 1 sessions" in text and "imported 3 approval records" in text
    assert "unknown mode 'telepathy'" in text and "unknown newer status 'exploded'" in text
    assert "ghost-run does not exist" in text and "tables not imported: cost_records, workflow_runs" in text


def test_a_second_import_duplicates_nothing(tmp_path, alice):
    path = _legacy_db(tmp_path / "cmbagent.db")
    call_command("import_cmbagent_db", str(path), "--owner", "alice", stdout=StringIO())
    counts = (Session.objects.count(), SessionState.objects.count(), LegacyApproval.objects.count())
    out = StringIO()
    call_command("import_cmbagent_db", str(path), "--owner", "alice", stdout=out)
    assert (Session.objects.count(), SessionState.objects.count(), LegacyApproval.objects.count()) == counts
    assert "imported 0 approval records (3 already here)" in out.getvalue()


@pytest.mark.parametrize("content, message", [(b"hello, not a database", "is not an SQLite database"), (None, "has no sessions table")])
def test_files_that_are_not_cmbagent_databases_import_nothing(tmp_path, alice, content, message):
    path = tmp_path / "other.db"
    if content is None:
        sqlite3.connect(path).execute("CREATE TABLE unrelated (x)").connection.close()
    else:
        path.write_bytes(content)
    with pytest.raises(CommandError, match=message):
        call_command("import_cmbagent_db", str(path), "--owner", "alice", stdout=StringIO())
    assert not Session.objects.exists() and not LegacyApproval.objects.exists()


def test_migrate_and_resolve_legacy_records_through_the_service(tmp_path, alice):
    call_command("import_cmbagent_db", str(_legacy_db(tmp_path / "c.db")), "--owner", "alice", stdout=StringIO())
    old = legacy.migrate(LegacyApproval.objects.get(legacy_id="a-old"))
    assert (old.kind, old.status, old.decision, old.feedback) == ("plan", "decided", "reject", "Add a null test")
    assert legacy.migrate(LegacyApproval.objects.get(legacy_id="a-old")).pk == old.pk  # once only
    pending = LegacyApproval.objects.get(legacy_id="a-pending")
    decided = legacy.resolve(pending, user=alice, decision="deny", feedback="not now", door="admin")
    assert (decided.kind, decided.status, decided.decision, decided.door) == ("code", "decided", "deny", "admin")
    assert ApprovalRequest.objects.count() == 2
