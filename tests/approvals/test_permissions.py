"""Who may see and decide approval requests, on every surface: the staff queue, the card on the
session page, the decide POST, the admin actions and the queue's socket.

Roles: anonymous, another user, staff without the approvals permission, staff with it, the owner.
"""
from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from approvals.models import ApprovalRequest
from tests.approvals.helpers import waiting_session
from tests.sessions.test_consumers import _closed_with, _communicator, _cookie_for

pytestmark = pytest.mark.django_db(transaction=True)

ROLES = ["anonymous", "other", "staff", "approver", "owner"]


@pytest.fixture
def people(django_user_model, alice, bob, approver):
    staff = django_user_model.objects.create_user("dave", password="x-Pa55word!", is_staff=True)
    # Admin access to the model, but not the approvals permission.
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_approvalrequest", "change_approvalrequest"]))
    approver.user_permissions.add(Permission.objects.get(codename="view_approvalrequest"))
    return {"anonymous": None, "other": bob, "staff": staff, "approver": approver, "owner": alice}


def _client(user) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _pending(request: ApprovalRequest) -> bool:
    request.refresh_from_db()
    return request.status == ApprovalRequest.Status.PENDING


# What each role gets; "login" is a redirect to the login page.
QUEUE = {"anonymous": "login", "other": 404, "staff": 404, "approver": 200, "owner": 404}
CARD = {"anonymous": "login", "other": 404, "staff": 404, "approver": "card", "owner": "card"}  # approvers watch the session
DECIDE = {"anonymous": "login", "other": 404, "staff": 404, "approver": "decided", "owner": "decided"}
ADMIN = {"anonymous": "login", "other": "login", "staff": "refused", "approver": "decided", "owner": "login"}
SOCKET = {"anonymous": 4401, "other": 4403, "staff": 4403, "approver": "open", "owner": 4403}


@pytest.mark.parametrize("role", ROLES)
def test_the_staff_queue(people, alice, role):
    request = ApprovalRequest.objects.get(session=waiting_session(alice))
    response = _client(people[role]).get(reverse("approvals:queue"))
    expected = QUEUE[role]
    if expected == "login":
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    else:
        assert response.status_code == expected
        assert (str(request.pk) in response.content.decode()) == (expected == 200)


@pytest.mark.parametrize("role", ROLES)
def test_the_card_on_the_session_page(people, alice, role):
    request = ApprovalRequest.objects.get(session=waiting_session(alice))
    response = _client(people[role]).get(request.session.get_absolute_url())
    expected = CARD[role]
    if expected == "login":
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    elif expected == "card":
        assert response.status_code == 200 and f'id="{request.dom_id}"' in response.content.decode()
    else:
        assert response.status_code == 404 and request.question not in response.content.decode()


@pytest.mark.parametrize("role", ROLES)
def test_the_decide_post(people, alice, role):
    request = ApprovalRequest.objects.get(session=waiting_session(alice))
    response = _client(people[role]).post(reverse("approvals:decide", kwargs={"request_id": request.pk}), {"decision": "approve"})
    expected = DECIDE[role]
    if expected == "login":
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    elif expected == "decided":
        assert response.status_code == 302
        request.refresh_from_db()
        assert (request.status, request.decided_by) == ("decided", people[role])
        return
    else:
        assert response.status_code == expected
    assert _pending(request)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", ["approve", "reject", "expire", "cancel"])
def test_the_admin_actions(people, alice, role, action):
    request = ApprovalRequest.objects.get(session=waiting_session(alice))
    url = reverse("admin:approvals_approvalrequest_changelist")
    response = _client(people[role]).post(url, {"action": action, "_selected_action": [str(request.pk)]})
    expected = ADMIN[role]
    if expected == "login":
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
        assert _pending(request)
    elif expected == "refused":
        # The action is not offered to staff without the permission; posting it anyway changes nothing.
        assert f'value="{action}"' not in _client(people[role]).get(url).content.decode()
        assert _pending(request)
    elif action == "expire":
        # The configured policy here is "pending": applied, recorded, and the request stays open.
        assert _pending(request) and request.audit[-1]["what"] == "expired" and request.audit[-1]["policy"] == "left pending"
    else:
        assert not _pending(request)
        assert request.status == {"approve": "decided", "reject": "decided", "cancel": "cancelled"}[action]


@pytest.mark.parametrize("role", ROLES)
async def test_the_queue_socket(people, alice, role):
    await database_sync_to_async(waiting_session)(alice)
    user = people[role]
    cookie = await database_sync_to_async(_cookie_for)(user) if user is not None else None
    communicator = _communicator("/ws/approvals/", cookie=cookie)
    if SOCKET[role] == "open":
        connected, _ = await communicator.connect()
        assert connected
        assert 'id="approval-rows"' in await communicator.receive_from(timeout=5)  # the queue, not a close frame
        await communicator.disconnect()
    else:
        assert await _closed_with(communicator) == SOCKET[role]
