"""The sessions' admin: a title can be corrected; what the app runs by (status, owner, task, config, runs) cannot."""
from __future__ import annotations

import re

import pytest
from django.urls import reverse

from sessions import services
from sessions.models import Session, SessionState

pytestmark = pytest.mark.django_db


def _form_fields(html: str) -> dict[str, str]:
    """The change form's inputs as a browser would send them (the inline's management form included)."""
    fields = {}
    for tag in re.findall(r"<input[^>]*>", html):
        name = re.search(r'name="([^"]+)"', tag)
        if name and 'type="submit"' not in tag:
            value = re.search(r'value="([^"]*)"', tag)
            fields[name.group(1)] = value.group(1) if value else ""
    return fields


def test_a_status_cannot_be_set_by_hand_but_a_title_can(admin_client, alice):
    session = services.session_start(owner=alice, task="Fit the spectrum", mode="one_shot")
    Session.objects.filter(pk=session.pk).update(status=Session.Status.COMPLETED)
    url = reverse("admin:agent_sessions_session_change", args=[session.pk])
    page = admin_client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="status"' not in html and 'name="task"' not in html and 'name="owner"' not in html
    data = {**_form_fields(html), "title": "Spectrum fit, corrected", "status": "running", "task": "Something else"}
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    session.refresh_from_db()
    assert session.title == "Spectrum fit, corrected"
    assert (session.status, session.task) == (Session.Status.COMPLETED, "Fit the spectrum")


def test_sessions_are_not_added_in_the_admin(admin_client):
    assert admin_client.get(reverse("admin:agent_sessions_session_add")).status_code == 403


def test_a_saved_state_is_shown_but_not_edited_in_the_admin(admin_client, alice):
    session = services.session_start(owner=alice, task="Fit the spectrum", mode="one_shot")
    state = SessionState.objects.get(session=session)
    before = (state.version, state.current_phase, state.current_step)
    url = reverse("admin:agent_sessions_sessionstate_change", args=[state.pk])
    page = admin_client.get(url)
    assert page.status_code == 200
    assert 'name="current_phase"' not in page.content.decode()
    response = admin_client.post(url, {"version": before[0] + 5, "current_phase": "tampered", "current_step": 9})
    assert response.status_code == 403
    state.refresh_from_db()
    assert (state.version, state.current_phase, state.current_step) == before
    assert admin_client.get(reverse("admin:agent_sessions_sessionstate_add")).status_code == 403
