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
