"""The approval service: one winner among concurrent deciders, permissions, expiry, cancellation."""
from __future__ import annotations

import threading

import pytest
from django.contrib.auth.models import Permission
from django.db import connection

from approvals import services as approvals
from approvals.models import ApprovalRequest, Door
from sessions import services
from sessions.models import Run
from tests.approvals.helpers import waiting_session

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_approval_event_records_one_pending_request(alice):
    session = waiting_session(alice)
    request = ApprovalRequest.objects.get(session=session)
    assert request.status == "pending" and request.kind == "plan" and request.options == ["approve", "reject", "edit"]
    assert request.payload["plan"][0]["description"] == "Plot it" and request.event_seq == session.last_seq - 1


def test_twenty_concurrent_decisions_have_exactly_one_winner(alice, approver, django_user_model):
    session = waiting_session(alice)
    request = ApprovalRequest.objects.get(session=session)
    deciders = [alice, approver] + [
        django_user_model.objects.create_user(f"staff{i}", is_staff=True) for i in range(18)
    ]
    for user in deciders[2:]:
        user.user_permissions.add(Permission.objects.get(codename="approvals"))
    deciders = [django_user_model.objects.get(pk=u.pk) for u in deciders]  # fresh permission caches
    barrier = threading.Barrier(len(deciders))
    results: list[tuple[str, str]] = []
    lock = threading.Lock()

    def decide(user, index):
        try:
            barrier.wait(timeout=30)
            approvals.decide(request.pk, user=user, decision="approve" if index % 2 else "reject", feedback=f"from {user.username}", door=Door.STAFF_QUEUE)
            outcome = ("won", user.username)
        except approvals.AlreadyDecided as exc:
            outcome = ("refused", str(exc))
        except Exception as exc:  # noqa: BLE001 - any other failure is a test failure, reported below
            outcome = ("error", repr(exc))
        finally:
            connection.close()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=decide, args=(user, i)) for i, user in enumerate(deciders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    winners = [who for what, who in results if what == "won"]
    refusals = [text for what, text in results if what == "refused"]
    assert [r for r in results if r[0] == "error"] == []
    assert len(winners) == 1 and len(refusals) == 19
    request.refresh_from_db()
    assert request.status == "decided" and request.decided_by.username == winners[0]
    assert all(f"by {winners[0]} via the staff queue at" in text for text in refusals)
    # One decision, one queued run to apply it.
    assert Run.objects.filter(session=session, status="queued").count() == 1
    assert Run.objects.get(session=session, status="queued").answer["by"] == winners[0]


def test_who_may_decide(alice, bob, approver, django_user_model):
    session = waiting_session(alice)
    request = ApprovalRequest.objects.get(session=session)
    plain_staff = django_user_model.objects.create_user("dave", is_staff=True)
    for outsider in (bob, plain_staff):
        with pytest.raises(PermissionError):
            approvals.decide(request.pk, user=outsider, decision="approve")
        assert not approvals.visible_to(outsider).exists()
    assert approvals.visible_to(approver).count() == 1 and approvals.visible_to(alice).count() == 1

    locked = waiting_session(alice, config={"owner_decides": False})
    with pytest.raises(PermissionError):
        approvals.decide(ApprovalRequest.objects.get(session=locked).pk, user=alice, decision="approve")
    decided = approvals.decide(ApprovalRequest.objects.get(session=locked).pk, user=approver, decision="approve", door=Door.STAFF_QUEUE)
    assert decided.decided_by == approver and decided.door == "staff_queue"


def test_a_decision_that_does_not_fit_writes_nothing(alice):
    session = waiting_session(alice)
    request = ApprovalRequest.objects.get(session=session)
    with pytest.raises(approvals.ApprovalError, match="needs feedback"):
        approvals.decide(request.pk, user=alice, decision="reject")
    with pytest.raises(approvals.ApprovalError, match="not an answer"):
        approvals.decide(request.pk, user=alice, decision="skip")
    request.refresh_from_db()
    assert request.status == "pending" and Run.objects.filter(session=session).count() == 1


def test_feedback_and_edits_are_recorded_and_carried_to_the_run(alice):
    session = waiting_session(alice)
    request = ApprovalRequest.objects.get(session=session)
    steps = [{"agent": "researcher", "description": "Read first"}, {"agent": "engineer", "description": "Then plot"}]
    approvals.decide(request.pk, user=alice, decision="edit", feedback="Two steps are enough", edits={"steps": steps})
    request.refresh_from_db()
    assert request.feedback == "Two steps are enough" and [s["description"] for s in request.edits["steps"]] == ["Read first", "Then plot"]
    run = Run.objects.get(session=session, status="queued")
    assert run.answer["decision"] == "edit" and run.answer["edits"]["steps"][1]["description"] == "Then plot"


@pytest.mark.parametrize(
    "kind, policy, decision, status",
    [
        ("plan", "reject", "reject", "expired"),
        ("plan", "approve", "approve", "expired"),
        ("plan", "pending", "", "pending"),
        ("budget", "reject", "stop", "expired"),
        ("budget", "approve", "continue", "expired"),
    ],
)
def test_expiry_applies_the_policy_and_records_it(alice, settings, kind, policy, decision, status):
    settings.APPROVAL_EXPIRY_POLICY = policy
    settings.APPROVAL_TIMEOUT_SECONDS = 60
    session = waiting_session(alice, kind=kind)
    request = ApprovalRequest.objects.get(session=session)
    assert request.expires_at is not None
    assert approvals.expire_due(now=request.expires_at.replace(year=request.expires_at.year + 1)) == 1
    request.refresh_from_db()
    assert request.status == status and request.decision == decision
    if policy == "pending":
        assert request.audit[-1]["policy"] == "left pending" and request.expires_at is None
    else:
        assert request.door == "timeout_policy" and request.decided_by is None
        assert Run.objects.get(session=session, status="queued").answer["decision"] == decision


def test_cancelling_the_session_cancels_its_requests(alice):
    session = waiting_session(alice)
    services.session_cancel(session_id=session.pk, user=alice)
    request = ApprovalRequest.objects.get(session=session)
    assert request.status == "cancelled" and "cancelled by alice" in request.audit[-1]["why"]
    with pytest.raises(approvals.AlreadyDecided, match="cancelled"):
        approvals.decide(request.pk, user=alice, decision="approve")


@pytest.mark.parametrize("kind, decision, ends_as", [("plan", "approve", "waiting_approval"), ("budget", "stop", "paused")])
def test_a_decision_taken_while_the_asking_run_is_ending_is_applied_when_it_ends(alice, approver, kind, decision, ends_as):
    """The card appears as the request is written; the run finishes a moment later. A quick decider is not refused."""
    session = waiting_session(alice, kind=kind, finish=False)
    run = Run.objects.get(session=session)
    assert run.status == "running"
    request = ApprovalRequest.objects.get(session=session)
    approvals.decide(request.pk, user=approver, decision=decision, door=Door.STAFF_QUEUE)
    request.refresh_from_db()
    assert (request.status, request.decision) == ("decided", decision)
    assert Run.objects.filter(session=session).count() == 1  # nothing queued beside a run still going

    services.run_finish(run_id=run.pk, worker_id=run.lease_owner, status=ends_as, detail="asked")
    queued = Run.objects.get(session=session, status="queued")
    assert queued.answer["decision"] == decision and queued.answer["by"] == "carol"
    session.refresh_from_db()
    assert session.status == "queued"  # the decision went on at once, no second click
    with pytest.raises(approvals.AlreadyDecided):
        approvals.decide(request.pk, user=alice, decision=decision)

