"""Sessions, their runs, the append-only event log and the saved engine state."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.urls import reverse

from orchestrator.engine.modes import Mode as EngineMode


class Status(models.TextChoices):
    """The lifecycle shared by a session and its runs: a session shows its latest run's status."""

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    WAITING_APPROVAL = "waiting_approval", "Waiting for approval"
    SUSPENDED = "suspended", "Suspended"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTION_TEXT = {
    "continue": ("Continue", "The round budget is spent; continue with a fresh one", True),
    "suspend": ("Suspend", "Stop the run now, keeping its state; Resume goes on from here", False),
    "resume": ("Resume", "Go on from the saved state", True),
    "retry": ("Retry", "Run again from the last saved event", True),
    "cancel": ("Cancel", "End the session for good", False),
}


class Session(models.Model):
    # The engine's modes, one place: adding a mode there offers it here.
    Mode = models.TextChoices("Mode", [(mode.name, (mode.value, mode.label)) for mode in EngineMode])

    Status = Status

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="agent_sessions")
    title = models.CharField(max_length=200)
    task = models.TextField()
    mode = models.CharField(max_length=40, choices=Mode.choices)
    model_provider = models.CharField(max_length=40, default="offline")
    config = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    # The seq of the newest event; the next event takes last_seq + 1 under a row lock.
    last_seq = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    # Per agent: {"agent": {"prompt": n, "completion": n, "cost": usd}}, kept with the totals event by event.
    usage = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return self.title

    def get_absolute_url(self) -> str:
        return reverse("sessions:detail", kwargs={"session_id": self.id})

    @property
    def actions(self) -> list[tuple[str, str, str, bool]]:
        """The lifecycle controls that apply now: (action, label, hint, primary)."""
        S = self.Status
        offered = {
            S.QUEUED: ["suspend", "cancel"],
            S.RUNNING: ["suspend", "cancel"],
            S.PAUSED: ["continue", "cancel"],
            S.WAITING_APPROVAL: ["cancel"],
            S.SUSPENDED: ["resume", "cancel"],
            S.FAILED: ["retry", "cancel"],
        }.get(self.status, [])
        return [(action, *ACTION_TEXT[action]) for action in offered]

    @property
    def usage_rows(self) -> list[tuple[str, int, int, float]]:
        """(agent, prompt tokens, completion tokens, cost), most expensive first."""
        rows = [(agent, u.get("prompt", 0), u.get("completion", 0), u.get("cost", 0.0)) for agent, u in (self.usage or {}).items()]
        return sorted(rows, key=lambda r: (-r[3], -r[1], r[0]))

    @property
    def max_turns(self) -> int | None:
        value = (self.config or {}).get("max_turns")
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def is_live(self) -> bool:
        return self.status in {self.Status.QUEUED, self.Status.RUNNING}

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Run(models.Model):
    """One execution attempt of a session, held by a worker through a lease."""

    Status = Status

    TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="runs")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    lease_owner = models.CharField(max_length=100, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    # A person's answer to the request the session waits on; the run starts by applying it.
    answer = models.JSONField(null=True, blank=True)
    # Set by a person while the run is running; its worker ends it (cancelled or suspended).
    stop_request = models.CharField(
        max_length=20, blank=True, choices=[("cancelled", "Cancel"), ("suspended", "Suspend")]
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["session", "number"]
        constraints = [models.UniqueConstraint(fields=["session", "number"], name="run_number_unique_per_session")]

    def __str__(self) -> str:
        return f"Run {self.number} of {self.session_id} ({self.status})"


class Event(models.Model):
    """The append-only log of everything the team did, numbered per session."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="events")
    run = models.ForeignKey(Run, on_delete=models.SET_NULL, null=True, blank=True, related_name="events")
    seq = models.PositiveIntegerField()
    kind = models.CharField(max_length=20)
    agent = models.CharField(max_length=60, blank=True)
    content = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["session", "seq"]
        constraints = [models.UniqueConstraint(fields=["session", "seq"], name="event_seq_unique_per_session")]

    def __str__(self) -> str:
        return f"#{self.seq} {self.kind} {self.agent}"

    @property
    def dom_id(self) -> str:
        return f"event-{self.seq}"


class SessionState(models.Model):
    """The saved engine state of a session, written with optimistic locking."""

    session = models.OneToOneField(Session, on_delete=models.CASCADE, related_name="state", primary_key=True)
    version = models.PositiveIntegerField(default=0)
    # A bounded tail of the conversation: the full history is the Event log.
    conversation_history = models.JSONField(default=list, blank=True)
    context_variables = models.JSONField(default=dict, blank=True)
    current_phase = models.CharField(max_length=40, blank=True)
    current_step = models.PositiveIntegerField(default=0)
    plan = models.JSONField(default=list, blank=True)
    engine_state = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"State of {self.session_id} v{self.version}"
