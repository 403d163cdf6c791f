"""Approval requests and legacy records in the admin: every action goes through the approval service."""
from __future__ import annotations

import logging
import warnings

from django.contrib import admin, messages

from approvals import legacy
from approvals import services as approvals
from approvals.models import ApprovalRequest, Door, LegacyApproval
from orchestrator.engine import hitl

logger = logging.getLogger(__name__)


class ApprovalsPermissionMixin:
    def has_approvals_permission(self, request) -> bool:
        return request.user.has_perm("approvals.approvals")

    def has_add_permission(self, request) -> bool:
        return False  # requests come from runs and imports, never by hand

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # the audit trail stays


def _report(modeladmin, request, done: int, refused: list[str], verb: str) -> None:
    if done:
        modeladmin.message_user(request, f"{verb} {done} request(s).", messages.SUCCESS)
    for reason in refused[:10]:
        modeladmin.message_user(request, reason, messages.WARNING)
    if len(refused) > 10:
        modeladmin.message_user(request, f"… and {len(refused) - 10} more refused.", messages.WARNING)


def _decide_all(modeladmin, request, queryset, choose, verb: str) -> None:
    done, refused = 0, []
    for item in queryset:
        decision, feedback = choose(item)
        try:
            approvals.decide(item.pk, user=request.user, decision=decision, feedback=feedback, door=Door.ADMIN)
            done += 1
        except (approvals.ApprovalError, PermissionError) as exc:
            refused.append(f"{item}: {exc}")
    _report(modeladmin, request, done, refused, verb)


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(ApprovalsPermissionMixin, admin.ModelAdmin):
    list_display = ["kind", "session", "status", "decision", "decided_by", "door", "created_at", "expires_at"]
    list_filter = ["status", "kind", "door", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["session__title", "session__task", "question", "feedback", "decided_by__username"]
    list_select_related = ["session", "decided_by"]
    readonly_fields = [
        "id", "session", "event_seq", "kind", "question", "options", "payload", "status", "decision", "feedback",
        "edits", "decided_by", "decided_at", "door", "audit", "created_at", "expires_at",
    ]
    actions = ["approve", "reject", "expire", "cancel"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # decided through the actions, never edited

    def has_view_permission(self, request, obj=None) -> bool:
        return self.has_approvals_permission(request) or super().has_view_permission(request, obj)

    @admin.action(description="Approve (the approving answer of each request)", permissions=["approvals"])
    def approve(self, request, queryset):
        _decide_all(self, request, queryset, lambda item: (hitl.Request(item.kind).default, ""), "Approved")

    @admin.action(description="Reject (deny, abort or finish, by kind)", permissions=["approvals"])
    def reject(self, request, queryset):
        _decide_all(
            self, request, queryset,
            lambda item: (approvals.REJECTING[item.kind], f"Rejected in the admin by {request.user.get_username()}."),
            "Rejected",
        )

    @admin.action(description="Expire now (apply the expiry policy)", permissions=["approvals"])
    def expire(self, request, queryset):
        done, refused = 0, []
        for item in queryset:
            outcome = approvals.expire(item.pk)
            if outcome == "not pending":
                refused.append(f"{item}: not pending.")
            else:
                done += 1
        _report(self, request, done, refused, "Expired")

    @admin.action(description="Cancel", permissions=["approvals"])
    def cancel(self, request, queryset):
        done, refused = 0, []
        for item in queryset:
            if approvals.cancel(item.pk, reason=f"cancelled in the admin by {request.user.get_username()}"):
                done += 1
            else:
                refused.append(f"{item}: not pending.")
        _report(self, request, done, refused, "Cancelled")


@admin.register(LegacyApproval)
class LegacyApprovalAdmin(ApprovalsPermissionMixin, admin.ModelAdmin):
    list_display = ["legacy_id", "generation", "approval_type", "status", "resolution", "session", "created_at", "migrated_to"]
    list_filter = ["generation", "status", "approval_type"]
    search_fields = ["legacy_id", "run_id", "legacy_session_id", "user_feedback"]
    readonly_fields = [f.name for f in LegacyApproval._meta.fields]
    actions = ["resolve_through_service", "migrate_to_current"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # kept verbatim

    def has_view_permission(self, request, obj=None) -> bool:
        return self.has_approvals_permission(request) or super().has_view_permission(request, obj)

    @admin.action(description="Resolve through the current service (approve; deprecated path)", permissions=["approvals"])
    def resolve_through_service(self, request, queryset):
        warnings.warn(
            "Resolving legacy approval records is deprecated: migrate them to current records and decide those.",
            DeprecationWarning,
            stacklevel=2,
        )
        logger.warning("deprecated: %s resolved legacy approvals through the admin", request.user.get_username())
        done, refused = 0, []
        for record in queryset:
            try:
                legacy.resolve(record, user=request.user, decision="approve", door=Door.ADMIN)
                done += 1
            except (approvals.ApprovalError, PermissionError, legacy.LegacyError) as exc:
                refused.append(f"{record}: {exc}")
        _report(self, request, done, refused, "Resolved")

    @admin.action(description="Migrate to current records", permissions=["approvals"])
    def migrate_to_current(self, request, queryset):
        done, refused = 0, []
        for record in queryset:
            try:
                legacy.migrate(record)
                done += 1
            except legacy.LegacyError as exc:
                refused.append(f"{record}: {exc}")
        _report(self, request, done, refused, "Migrated")
