"""The terminal command runs a task through the same worker and prints the conversation."""
from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from sessions.models import Event, Session

pytestmark = pytest.mark.django_db(transaction=True)


def test_run_task_prints_the_conversation_and_completes(django_user_model):
    django_user_model.objects.create_superuser("root-user", password="x-pass-123")
    out = StringIO()
    call_command("run_task", "Plot a damped cosine", "--mode", "one_shot", stdout=out)
    session = Session.objects.get()
    text = out.getvalue()
    assert session.status == "completed"
    assert f"ended: completed ({session.last_seq} events" in text
    assert "engineer" in text and "tool_result" in text and "artifact" in text
    assert Event.objects.filter(session=session).count() == session.last_seq


def test_run_task_pauses_at_the_round_budget(django_user_model):
    django_user_model.objects.create_superuser("root-user", password="x-pass-123")
    out = StringIO()
    call_command("run_task", "Plot a damped cosine", "--max-turns", "2", stdout=out)
    assert Session.objects.get().status == "paused"
    assert "ended: paused" in out.getvalue()


def test_run_task_without_a_user_is_a_clear_error():
    with pytest.raises(CommandError, match="No superuser"):
        call_command("run_task", "anything", stdout=StringIO())


def test_run_task_asks_at_the_prompt_and_feedback_reaches_the_planner(django_user_model):
    django_user_model.objects.create_superuser("root-user", password="x-pass-123")
    out = StringIO()
    answers = StringIO("reject\nAdd a convergence check of the sampling\napprove\n\n")
    call_command("run_task", "Plot a damped cosine", "--mode", "hitl_plan", stdout=out, stdin=answers)
    session = Session.objects.get()
    text = out.getvalue()
    assert session.status == "completed", text
    assert text.count("?? The team agreed on a plan") == 2
    decisions = list(Event.objects.filter(session=session, kind="decision").values_list("data__decision", flat=True))
    assert decisions == ["reject", "approve"]
    plans = Event.objects.filter(session=session, kind="plan").order_by("seq")
    assert "convergence check" in plans.last().data["steps"][2]["description"]
    seqs = list(Event.objects.filter(session=session).values_list("seq", flat=True))
    assert seqs == list(range(1, session.last_seq + 1))


def test_run_task_auto_approve_answers_every_request(django_user_model):
    django_user_model.objects.create_superuser("root-user", password="x-pass-123")
    out = StringIO()
    call_command("run_task", "Plot a damped cosine", "--mode", "hitl_both", "--approve-code", "--auto-approve", stdout=out)
    session = Session.objects.get()
    assert session.status == "completed"
    decisions = list(Event.objects.filter(session=session, kind="decision").values_list("data__decision", flat=True))
    # The plan, the code guard before the one computational step, and a checkpoint after each of 3 steps.
    assert decisions == ["approve", "continue", "allow", "continue", "continue"]
    assert out.getvalue().count("(--auto-approve)") == 5


def test_run_task_without_a_terminal_leaves_the_request_waiting(django_user_model):
    django_user_model.objects.create_superuser("root-user", password="x-pass-123")
    out = StringIO()
    call_command("run_task", "Plot a damped cosine", "--mode", "hitl_plan", stdout=out)
    assert Session.objects.get().status == "waiting_approval"
    assert "the session waits" in out.getvalue()


def test_run_task_auto_approve_continues_spent_budgets(django_user_model):
    django_user_model.objects.create_superuser("root-user", password="x-pass-123")
    call_command("run_task", "Plot a damped cosine", "--max-turns", "4", "--auto-approve", stdout=StringIO())
    session = Session.objects.get()
    assert session.status == "completed" and session.runs.count() > 2
