"""The approval card on the session page, the staff queue (live), and the socket doors (current and legacy)."""
from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.urls import reverse

from approvals.models import ApprovalRequest
from sessions.models import Run
from tests.approvals.helpers import waiting_session
from tests.sessions.test_consumers import _communicator, _cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_session_page_shows_the_card_and_the_owner_decides(client, alice):
    session = waiting_session(alice)
    request = ApprovalRequest.objects.get(session=session)
    client.force_login(alice)
    html = client.get(session.get_absolute_url()).content.decode()
    assert f'id="approval-{request.pk}"' in html and 'data-decision="approve"' in html and "[engineer] Plot it" in html
    response = client.post(reverse("approvals:decide", args=[request.pk]), {"decision": "reject", "feedback": ""}, HTTP_HX_REQUEST="true")
    assert "needs feedback" in response.content.decode()
    response = client.post(
        reverse("approvals:decide", args=[request.pk]),
        {"decision": "edit", "steps": "[researcher] Read\n[engineer] Plot\n", "feedback": "shorter"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 204
    request.refresh_from_db()
    assert request.decision == "edit" and [s["agent"] for s in request.edits["steps"]] == ["researcher", "engineer"]
    assert f'id="approval-{request.pk}"' not in client.get(session.get_absolute_url()).content.decode()


def test_others_cannot_see_or_decide(client, alice, bob):
    request = ApprovalRequest.objects.get(session=waiting_session(alice))
    client.force_login(bob)
    assert client.post(reverse("approvals:decide", args=[request.pk]), {"decision": "approve"}).status_code == 404
    assert client.get(reverse("approvals:queue")).status_code == 404
    request.refresh_from_db()
    assert request.status == "pending"


def test_staff_queue_lists_filters_and_decides_in_place(client, alice, approver):
    plan = ApprovalRequest.objects.get(session=waiting_session(alice))
    code = ApprovalRequest.objects.get(session=waiting_session(alice, kind="code"))
    client.force_login(approver)
    html = client.get(reverse("approvals:queue")).content.decode()
    assert f"approval-{plan.pk}" in html and f"approval-{code.pk}" in html
    assert "· alice's session" in html  # whose session each card is for
    html = client.get(reverse("approvals:queue") + "?kind=code").content.decode()
    assert f"approval-{plan.pk}" not in html and f"approval-{code.pk}" in html
    response = client.post(reverse("approvals:decide", args=[code.pk]), {"decision": "deny", "door": "staff_queue"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 204
    code.refresh_from_db()
    assert (code.decision, code.door, code.decided_by) == ("deny", "staff_queue", approver)


async def test_queue_socket_updates_live_and_refuses_outsiders(alice, bob, approver):
    ws = _communicator("/ws/approvals/?kind=plan", cookie=await database_sync_to_async(_cookie_for)(approver))
    assert (await ws.connect())[0]
    first = await ws.receive_from(timeout=5)  # the queue as it is on connect (also after a reconnect)
    assert 'id="approval-rows"' in first and "Nothing is waiting" in first
    session = await database_sync_to_async(waiting_session)(alice)
    html = await ws.receive_from(timeout=5)
    request = await database_sync_to_async(ApprovalRequest.objects.get)(session=session)
    assert f"approval-{request.pk}" in html and 'id="approval-rows"' in html
    from approvals import services as approvals

    await database_sync_to_async(approvals.decide)(request.pk, user=approver, decision="approve", door="staff_queue")
    html = await ws.receive_from(timeout=5)
    assert f"approval-{request.pk}" not in html and "Nothing is waiting" in html
    await ws.disconnect()

    outsider = _communicator("/ws/approvals/", cookie=await database_sync_to_async(_cookie_for)(bob))
    await outsider.connect()
    assert (await outsider.receive_output(timeout=5))["code"] == 4403


async def test_legacy_socket_frames_go_through_the_service(alice, caplog):
    session = await database_sync_to_async(waiting_session)(alice)
    request = await database_sync_to_async(ApprovalRequest.objects.get)(session=session)
    ws = _communicator(f"/ws/sessions/{session.pk}/", cookie=await database_sync_to_async(_cookie_for)(alice))
    await ws.connect()
    frame = {"type": "approval_response", "approval_id": str(request.pk), "approved": False, "feedback": "Add error bars", "copilotSessionId": str(session.pk)}
    await ws.send_to(text_data=json.dumps(frame))
    await ws.receive_nothing(timeout=1)
    await database_sync_to_async(request.refresh_from_db)()
    assert (request.status, request.decision, request.feedback, request.door) == ("decided", "reject", "Add error bars", "legacy_api")
    assert "deprecated socket frame 'approval_response'" in caplog.text and "copilotSessionId" in caplog.text
    run = await database_sync_to_async(Run.objects.get)(session=session, status="queued")
    assert run.answer["feedback"] == "Add error bars"
    # A second decision through the legacy door is refused with who was first.
    await ws.send_to(text_data=json.dumps({"type": "resolve_approval", "approval_id": str(request.pk), "resolution": "approved"}))
    assert "Already decided: reject by alice via the legacy socket api" in await ws.receive_from(timeout=5)
    await ws.disconnect()


def test_a_spent_budget_is_a_card_with_continue_and_stop_in_place_of_the_status_button(client, alice):
    session = waiting_session(alice, kind="budget")
    request = ApprovalRequest.objects.get(session=session)
    client.force_login(alice)
    html = client.get(session.get_absolute_url()).content.decode()
    assert f'id="{request.dom_id}"' in html and "Round budget: your decision" in html
    assert 'data-decision="continue"' in html and 'data-decision="stop"' in html
    assert 'data-action="continue"' not in html and 'data-action="cancel"' in html  # one Continue on the page, not two
    assert 'name="feedback"' not in html.split(f'id="{request.dom_id}"')[1].split("</article>")[0]  # nothing to tell the team
    response = client.post(reverse("sessions:action", kwargs={"session_id": session.pk, "action": "continue"}))
    assert response.status_code in (200, 302)
    request.refresh_from_db()
    assert (request.status, request.decision, request.door, request.decided_by) == ("decided", "continue", "session_page", alice)

