from __future__ import annotations

from django.contrib import admin

from sessions.models import Event, Run, Session, SessionState


class RunInline(admin.TabularInline):
    """A session's runs, as its workers left them: shown, never edited here (a worker holds a run by its lease)."""

    model = Run
    extra = 0
    can_delete = False
    fields = readonly_fields = ["number", "status", "lease_owner", "heartbeat_at", "error", "started_at", "finished_at"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    """Sessions are started, run and ended through the app (the form, the workers, the lifecycle controls):
    here a title can be corrected and a session deleted whole; the rest is shown as it is. A status set by
    hand would show a run that nothing runs."""

    list_display = ["title", "owner", "mode", "status", "last_seq", "created_at"]
    list_filter = ["status", "mode"]
    search_fields = ["title", "task", "owner__username"]
    readonly_fields = [
        "id", "owner", "task", "mode", "model_provider", "config", "status", "last_seq", "prompt_tokens", "completion_tokens",
        "cost_usd", "usage", "created_at", "updated_at",
    ]
    inlines = [RunInline]

    def has_add_permission(self, request) -> bool:
        return False  # the new-session form starts sessions, with their state and first run


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["session", "seq", "kind", "agent", "created_at"]
    list_filter = ["kind"]
    search_fields = ["session__id", "agent", "content"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # the log is append-only

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # nor can events be taken out of it (a session is deleted whole)


@admin.register(SessionState)
class SessionStateAdmin(admin.ModelAdmin):
    """The engine's saved state, as the last checkpoint wrote it: shown, never edited here. A hand edit would be
    a tampered checkpoint, which a resume refuses; the state changes only with the events it belongs to."""

    list_display = ["session", "version", "current_phase", "current_step", "updated_at"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_add_permission(self, request) -> bool:
        return False  # a session's state is written with its first checkpoint
