"""Approval requests (current) and approval records imported from a CMBAgent database (legacy)."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Door(models.TextChoices):
    """Through which door a decision came in."""

    SESSION_PAGE = "session_page", "Session page"
    STAFF_QUEUE = "staff_queue", "Staff queue"
    ADMIN = "admin", "Admin"
    LEGACY_API = "legacy_api", "Legacy socket API"
    TERMINAL = "terminal", "Terminal (run_task)"
    TIMEOUT_POLICY = "timeout_policy", "Timeout policy"


class ApprovalRequest(models.Model):
    """A decision the engine left to a person; one per approval event of a session."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DECIDED = "decided", "Decided"
        EXPIRED = "expired", "Expired"
        CANCELLED = "cancelled", "Cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey("agent_sessions.Session", on_delete=models.CASCADE, related_name="approval_requests")
    # seq of the approval event in the session's log; empty for a request migrated from a legacy record.
    event_seq = models.PositiveIntegerField(null=True, blank=True)
    kind = models.CharField(max_length=20, db_index=True)  # plan, step, code, error, copilot_turn, budget
    question = models.TextField()
    options = models.JSONField(default=list)
    payload = models.JSONField(default=dict, blank=True)  # the plan, code, error or step being decided on
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    decision = models.CharField(max_length=20, blank=True)
    feedback = models.TextField(blank=True)
    edits = models.JSONField(default=dict, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="approval_decisions"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    door = models.CharField(max_length=20, choices=Door.choices, blank=True)
    # What happened to the request besides its decision (expiry that left it pending, cancellation), oldest first.
    audit = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["session", "event_seq"], name="one_request_per_approval_event")]
        permissions = [("approvals", "Can see and decide the approval requests of every session")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} request of {self.session_id} ({self.status})"

    def get_kind_display(self) -> str:
        return {"plan": "Plan", "step": "Step checkpoint", "code": "Code", "error": "Error recovery", "copilot_turn": "Copilot turn", "budget": "Round budget"}.get(
            self.kind, self.kind
        )

    @property
    def dom_id(self) -> str:
        return f"approval-{self.pk}"


class LegacyApproval(models.Model):
    """An approval record imported from a CMBAgent database, kept verbatim."""

    class Generation(models.TextChoices):
        LEGACY = "legacy", "Old writer (context_snapshot, user_feedback)"
        NEWER = "newer", "Newer writer (context, resolution, result)"

    legacy_id = models.CharField(max_length=64, unique=True)
    generation = models.CharField(max_length=10, choices=Generation.choices)
    run_id = models.CharField(max_length=64, blank=True)
    legacy_session_id = models.CharField(max_length=64, blank=True)
    step_id = models.CharField(max_length=64, blank=True)
    approval_type = models.CharField(max_length=50)
    context = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=20, db_index=True)
    resolution = models.CharField(max_length=20, blank=True)
    result = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    requested_at = models.DateTimeField(null=True, blank=True)
    context_snapshot = models.JSONField(null=True, blank=True)
    user_feedback = models.TextField(blank=True)
    # Where it came from and what became of it here.
    source_file = models.CharField(max_length=500, blank=True)
    imported_at = models.DateTimeField(auto_now_add=True)
    session = models.ForeignKey(
        "agent_sessions.Session", on_delete=models.SET_NULL, null=True, blank=True, related_name="legacy_approvals"
    )
    migrated_to = models.OneToOneField(
        ApprovalRequest, on_delete=models.SET_NULL, null=True, blank=True, related_name="legacy_record"
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Legacy {self.approval_type} {self.legacy_id} ({self.status})"

    @property
    def is_pending(self) -> bool:
        return self.status == "pending"
