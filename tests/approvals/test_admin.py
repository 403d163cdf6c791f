"""The admin: both models listed, read-only audit, actions through the service, permission-gated."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from approvals.models import ApprovalRequest
from sessions.models import Run
from tests.approvals.helpers import waiting_session

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff_client(client, django_user_model):
    def make(with_permission: bool):
        user = django_user_model.objects.create_user(f"staff{with_permission}", password="x", is_staff=True)
        user.user_permissions.add(Permission.objects.get(codename="view_approvalrequest"))
        if with_permission:
            user.user_permissions.add(Permission.objects.get(codename="approvals"))
        client.force_login(user)
        return client

    return make


def _act(client, action, request):
    url = reverse("admin:approvals_approvalrequest_changelist")
    return client.post(url, {"action": action, "_selected_action": [str(request.pk)]}, follow=True)


def test_approve_action_decides_through_the_service(staff_client, alice):
    session = waiting_session(alice)
    request = ApprovalRequest.objects.get(session=session)
    client = staff_client(True)
    page = client.get(reverse("admin:approvals_approvalrequest_changelist") + "?status__exact=pending&q=damped")
    assert page.status_code == 200 and str(request.pk) in page.content.decode()
    response = _act(client, "approve", request)
    assert "Approved 1 request(s)." in response.content.decode()
    request.refresh_from_db()
    assert (request.status, request.decision, request.door, request.decided_by.username) == ("decided", "approve", "admin", "staffTrue")
    assert Run.objects.filter(session=session, status="queued").count() == 1
    # A second approve is refused with who decided, not silently repeated.
    again = _act(client, "approve", request)
    assert "Already decided: approve by staffTrue via the admin" in again.content.decode()


def test_actions_need_the_approvals_permission(staff_client, alice):
    request = ApprovalRequest.objects.get(session=waiting_session(alice))
    client = staff_client(False)
    page = client.get(reverse("admin:approvals_approvalrequest_changelist"))
    assert page.status_code == 200 and 'value="approve"' not in page.content.decode()
    _act(client, "approve", request)
    request.refresh_from_db()
    assert request.status == "pending"


def test_change_page_is_read_only(staff_client, alice):
    request = ApprovalRequest.objects.get(session=waiting_session(alice))
    client = staff_client(True)
    url = reverse("admin:approvals_approvalrequest_change", args=[request.pk])
    client.post(url, {"decision": "approve", "status": "decided"})
    request.refresh_from_db()
    assert request.status == "pending"
    assert client.get(reverse("admin:approvals_approvalrequest_add")).status_code == 403
