"""Pages: who sees what, and how bad input is answered."""
from __future__ import annotations

import json
import re

import pytest
from django.urls import reverse

from sessions import services
from sessions.models import Session

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


def test_anonymous_is_sent_to_login(client):
    """Pages need a login."""
    response = client.get(reverse("sessions:list"))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_list_shows_only_own_sessions(alice_client, alice, bob):
    """The list shows the user's sessions with status, never someone else's."""
    services.session_start(owner=alice, task="Alice's spectrum task", mode="one_shot")
    services.session_start(owner=bob, task="Bob's secret task", mode="one_shot")
    body = alice_client.get(reverse("sessions:list")).content.decode()
    assert "Alice&#x27;s spectrum task" in body and "Queued" in body
    assert "Bob" not in body


def test_start_session_redirects_to_its_page(alice_client, alice):
    """Posting the form starts a session and shows its page, labelled as using the offline model."""
    response = alice_client.post(reverse("sessions:new"), {"task": "Map the CMB", "mode": "planning_and_control"}, follow=True)
    session = Session.objects.get(owner=alice)
    assert response.redirect_chain == [(session.get_absolute_url(), 302)]
    body = response.content.decode()
    assert "offline model" in body and 'data-status="queued"' in body
    assert f'ws-connect="/ws/sessions/{session.pk}/"' in body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"task": "", "mode": "one_shot"}, "Describe the task for the team."),
        ({"task": "x" * 100_000, "mode": "one_shot"}, "100,000 characters long; the limit is 20,000"),
        ({"task": "ok", "mode": "teleport"}, "Select a valid choice. teleport is not one of the available choices."),
        ({"task": "ok", "mode": "one_shot", "title": "t" * 201}, "Ensure this value has at most 200 characters (it has 201)."),
        ({"task": "ok", "mode": "one_shot", "auto_continue": "5"}, "Auto-continue counts round budgets: set a Round budget"),
    ],
)
def test_bad_form_input_is_explained_and_writes_nothing(alice_client, data, message):
    """Bad input gets a 400 with the reason on the form, and no session."""
    response = alice_client.post(reverse("sessions:new"), data)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Session.objects.exists()


def test_the_form_names_the_model_and_says_when_it_cannot_be_used(alice_client, monkeypatch):
    """The form says which model the team runs on; one that a run would refuse is named with why, before Start."""
    url = reverse("sessions:new")
    monkeypatch.setenv("CMBAGENT_MODEL_PROVIDER", "offline")
    body = alice_client.get(url).content.decode()
    assert 'data-testid="model"' in body and "offline model" in body and "model-problem" not in body
    monkeypatch.setenv("CMBAGENT_MODEL_PROVIDER", "openai")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    body = alice_client.get(url).content.decode()
    assert 'data-testid="model-problem"' in body and "without an API key" in body and "offline model" not in body
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("CMBAGENT_MODEL", "tiny")
    body = alice_client.get(url).content.decode()
    assert "model-problem" not in body and "tiny at http://127.0.0.1:9/v1" in body


def test_other_users_session_is_not_found(alice_client, bob):
    """Another user's session looks exactly like a missing one."""
    session = services.session_start(owner=bob, task="Bob's", mode="one_shot")
    assert alice_client.get(session.get_absolute_url()).status_code == 404


def test_staff_who_decide_approvals_watch_a_session_without_its_controls(client, bob, approver):
    """The queue links to the session behind a request: staff with the approvals permission see it, told they
    are watching, with none of the owner's controls; a control posted anyway is refused and changes nothing."""
    session = services.session_start(owner=bob, task="Bob's spectrum", mode="one_shot")
    client.force_login(approver)
    response = client.get(session.get_absolute_url())
    assert response.status_code == 200
    body = response.content.decode()
    assert 'data-testid="watching"' in body and "You are watching bob's session as staff" in body
    assert "session-head--watching" in body and "Bob&#x27;s spectrum" in body
    assert client.get(reverse("sessions:export", kwargs={"session_id": session.pk, "fmt": "md"})).status_code == 200
    response = client.post(reverse("sessions:action", kwargs={"session_id": session.pk, "action": "cancel"}))
    assert response.status_code == 404
    session.refresh_from_db()
    assert session.status == Session.Status.QUEUED


def test_the_owner_is_not_told_they_are_watching(alice_client, alice):
    session = services.session_start(owner=alice, task="Mine", mode="one_shot")
    body = alice_client.get(session.get_absolute_url()).content.decode()
    assert 'data-testid="watching"' not in body and "session-head--watching" not in body


def test_staff_without_the_approvals_permission_do_not_see_others_sessions(client, bob, django_user_model):
    session = services.session_start(owner=bob, task="Bob's", mode="one_shot")
    client.force_login(django_user_model.objects.create_user("dave", password="x-Pa55word!", is_staff=True))
    assert client.get(session.get_absolute_url()).status_code == 404


@pytest.mark.parametrize("path", ["/sessions/not-a-uuid/", "/sessions/00000000-0000-0000-0000-000000000000/"])
def test_unknown_or_malformed_ids_are_404(alice_client, path):
    assert alice_client.get(path).status_code == 404


def test_task_text_is_escaped(alice_client, alice):
    """Task text is shown as text: markup in it never reaches the page as markup."""
    session = services.session_start(owner=alice, task="<script>alert(1)</script> **bold** <img src=x onerror=alert(2)>", mode="one_shot")
    body = alice_client.get(session.get_absolute_url()).content.decode()
    assert "<script>alert(1)" not in body and "<img src=x" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "<strong>bold</strong>" in body


def test_one_time_login_link_works_once(client, alice, django_user_model):
    """The link printed by ensure_admin logs in once; a second use is refused."""
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("ensure_admin", base_url="http://testserver", stdout=out)
    text = out.getvalue()
    assert "Created admin account 'admin' with password: " in text
    password = text.split("password: ")[1].split()[0]
    assert len(password) >= 12 and django_user_model.objects.get(username="admin").check_password(password)
    link = text.split("One-time login link: ")[1].strip().replace("http://testserver", "")
    assert client.get(link).status_code == 302
    assert client.get(reverse("sessions:list")).status_code == 200
    client.logout()
    assert client.get(link).status_code == 400
    out = StringIO()
    call_command("ensure_admin", stdout=out)
    assert "exists" in out.getvalue() and "password:" not in out.getvalue()


def test_logout_is_a_post(alice_client):
    assert alice_client.post(reverse("logout")).status_code == 302
    assert alice_client.get(reverse("sessions:list")).status_code == 302


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


class TestSessionFiles:
    @pytest.fixture
    def files(self, settings, alice):
        session = services.session_start(owner=alice, task="plots", mode="one_shot")
        root = settings.RUNS_DIR / str(session.pk)
        (root / ".code").mkdir(parents=True)
        (root / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
        (root / "data.csv").write_text("x,y\n1,2\n")
        (root / "evil.svg").write_text("<svg onload=alert(1)>")
        (root / ".code" / "block_001.py").write_text("print(1)")
        (settings.RUNS_DIR / "secret.txt").write_text("not yours")
        return session

    def test_owner_gets_images_inline_and_data_as_download(self, alice_client, files):
        image = alice_client.get(reverse("sessions:file", args=[files.pk, "plot.png"]))
        assert image.status_code == 200 and image["Content-Type"] == "image/png"
        assert "attachment" not in image.get("Content-Disposition", "")
        data = alice_client.get(reverse("sessions:file", args=[files.pk, "data.csv"]))
        assert data.status_code == 200 and data["Content-Disposition"].startswith("attachment")
        svg = alice_client.get(reverse("sessions:file", args=[files.pk, "evil.svg"]))
        assert svg["Content-Type"] == "application/octet-stream" and "sandbox" in svg["Content-Security-Policy"]

    @pytest.mark.parametrize("path", ["../secret.txt", ".code/block_001.py", "missing.png", "..%2Fsecret.txt"])
    def test_paths_outside_the_outputs_are_not_found(self, alice_client, files, path):
        assert alice_client.get(f"/sessions/{files.pk}/files/{path}").status_code == 404

    def test_other_users_cannot_fetch_files(self, client, bob, files):
        client.force_login(bob)
        assert client.get(reverse("sessions:file", args=[files.pk, "plot.png"])).status_code == 404


class TestContinue:
    def _paused(self, alice):
        session = services.session_start(owner=alice, task="budgeted", mode="one_shot", config={"max_turns": 1})
        Session.objects.filter(pk=session.pk).update(status="paused")
        return session

    def test_continue_queues_a_new_run(self, alice_client, alice):
        session = self._paused(alice)
        response = alice_client.post(reverse("sessions:continue", args=[session.pk]), HTTP_HX_REQUEST="true")
        assert response.status_code == 204
        session.refresh_from_db()
        assert session.status == "queued" and session.runs.count() == 2

    def test_continue_of_a_running_session_is_explained(self, alice_client, alice):
        session = services.session_start(owner=alice, task="t", mode="one_shot")
        response = alice_client.post(reverse("sessions:continue", args=[session.pk]), HTTP_HX_REQUEST="true")
        assert response.status_code == 200
        assert "Only a paused session can be continued; this one is queued." in response.content.decode()
        assert session.runs.count() == 1

    def test_continue_needs_post_and_ownership(self, alice_client, alice, bob, client):
        session = self._paused(alice)
        assert alice_client.get(reverse("sessions:continue", args=[session.pk])).status_code == 405
        client.force_login(bob)
        assert client.post(reverse("sessions:continue", args=[session.pk])).status_code == 404
        assert session.runs.count() == 1

    def test_paused_page_offers_continue(self, alice_client, alice):
        session = self._paused(alice)
        body = alice_client.get(session.get_absolute_url()).content.decode()
        assert f'hx-post="/sessions/{session.pk}/continue/"' in body and ">Continue</button>" in body


def test_round_budget_from_the_form(alice_client, alice):
    """The form's round budget and auto-continue land in the session's config."""
    alice_client.post(reverse("sessions:new"), {"task": "t", "mode": "one_shot", "max_rounds": "4", "auto_continue": "2"})
    assert Session.objects.get(owner=alice).config == {"max_turns": 4, "auto_continue": 2}


@pytest.mark.parametrize("budget", ["0", "-3", "abc", "100000"])
def test_bad_round_budget_is_refused(alice_client, budget):
    response = alice_client.post(reverse("sessions:new"), {"task": "t", "mode": "one_shot", "max_rounds": budget})
    assert response.status_code == 400 and not Session.objects.exists()


def test_usage_by_agent_sums_tokens_and_cost(alice_client, alice, bob, client):
    """The glance lists each agent's tokens and cost, with the session's totals, on the page and in every push."""
    from sessions.fragments import render_push
    from sessions.models import Event
    from orchestrator.engine.events import EngineEvent, EventKind

    session = services.session_start(owner=alice, task="t", mode="one_shot")
    for agent, tokens, cost in [("engineer", 100, 0.25), ("engineer", 50, 0.5), ("executor", 10, 0.0)]:
        services.event_append(
            session_id=session.pk, run_id=None,
            event=EngineEvent(EventKind.HANDOFF, agent=agent, content="x", prompt_tokens=tokens, completion_tokens=1, cost_usd=cost),
        )
    session.refresh_from_db()
    pushed = render_push(session, [Event.objects.filter(session=session).latest("seq")])
    for body in (alice_client.get(session.get_absolute_url()).content.decode(), pushed):
        assert '<tr data-agent="engineer"><td>engineer</td><td>150</td><td>2</td><td>$0.75000</td></tr>' in body
        assert '<tr data-agent="executor"><td>executor</td><td>10</td><td>1</td><td>$0.00000</td></tr>' in body
        assert body.index('<tr data-agent="engineer">') < body.index('<tr data-agent="executor">')  # most expensive first
        assert '<th scope="row">Total</th><th>160</th><th>3</th><th>$0.75000</th>' in body
    client.force_login(bob)
    assert client.get(session.get_absolute_url()).status_code == 404


class TestLifecycleControls:
    @pytest.mark.parametrize(
        "status, offered",
        [
            ("queued", ["suspend", "cancel"]),
            ("running", ["suspend", "cancel"]),
            ("paused", ["continue", "cancel"]),
            ("waiting_approval", ["cancel"]),
            ("suspended", ["resume", "cancel"]),
            ("failed", ["retry", "cancel"]),
            ("completed", []),
            ("cancelled", []),
        ],
    )
    def test_page_offers_the_controls_that_apply(self, alice_client, alice, status, offered):
        session = services.session_start(owner=alice, task="t", mode="one_shot")
        Session.objects.filter(pk=session.pk).update(status=status)
        html = alice_client.get(session.get_absolute_url()).content.decode()
        assert re.findall(r'data-action="(\w+)"', html) == offered

    def test_suspend_resume_cancel_through_the_views(self, alice_client, alice):
        session = services.session_start(owner=alice, task="t", mode="one_shot")
        for action, status in [("suspend", "suspended"), ("resume", "queued"), ("cancel", "cancelled")]:
            response = alice_client.post(reverse("sessions:action", args=[session.pk, action]), HTTP_HX_REQUEST="true")
            assert response.status_code == 204, response.content
            session.refresh_from_db()
            assert session.status == status

    def test_refusals_are_explained_and_unknown_actions_are_404(self, alice_client, alice, bob, client):
        session = services.session_start(owner=alice, task="t", mode="one_shot")
        response = alice_client.post(reverse("sessions:action", args=[session.pk, "retry"]), HTTP_HX_REQUEST="true")
        assert "Only a failed session can be retried; this one is queued." in response.content.decode()
        assert alice_client.post(reverse("sessions:action", args=[session.pk, "explode"])).status_code == 404
        client.force_login(bob)
        assert client.post(reverse("sessions:action", args=[session.pk, "cancel"])).status_code == 404
        session.refresh_from_db()
        assert session.status == "queued"


class TestTranscriptWindow:
    """A long session opens at its newest window; older events come a window at a time."""

    def _long(self, owner, n=450):
        from sessions.models import Event

        session = services.session_start(owner=owner, task="long", mode="one_shot")
        Event.objects.bulk_create(
            Event(session=session, seq=seq, kind="message", agent="engineer", content=f"message number {seq}", data={})
            for seq in range(2, n + 1)
        )
        Session.objects.filter(pk=session.pk).update(last_seq=n)
        return session

    @staticmethod
    def _seqs(html):
        return [int(s) for s in re.findall(r'<article id="event-\d+" class="[^"]*" data-seq="(\d+)"', html)]

    def test_the_page_shows_the_newest_window_and_a_loader(self, alice_client, alice, settings):
        settings.TRANSCRIPT_WINDOW = 200
        session = self._long(alice)
        html = alice_client.get(session.get_absolute_url()).content.decode()
        assert self._seqs(html) == list(range(251, 451))
        assert f"?before=251" in html and "(250 more)" in html

        older = alice_client.get(reverse("sessions:events", args=[session.pk]) + "?before=251").content.decode()
        assert self._seqs(older) == list(range(51, 251)) and "?before=51" in older and "(50 more)" in older
        oldest = alice_client.get(reverse("sessions:events", args=[session.pk]) + "?before=51").content.decode()
        assert self._seqs(oldest) == list(range(1, 51)) and "older-events" not in oldest

    def test_a_short_session_has_no_loader(self, alice_client, alice):
        session = self._long(alice, n=20)
        html = alice_client.get(session.get_absolute_url()).content.decode()
        assert self._seqs(html) == list(range(1, 21)) and "older-events" not in html

    @pytest.mark.parametrize("before", ["", "abc", "1e9", "-5"])
    def test_bad_or_odd_cursors(self, alice_client, alice, before):
        session = self._long(alice, n=30)
        response = alice_client.get(reverse("sessions:events", args=[session.pk]) + f"?before={before}")
        if before == "-5":
            assert response.status_code == 200 and self._seqs(response.content.decode()) == []
        else:
            assert response.status_code == 400 and "?before=<seq>" in response.content.decode()

    def test_others_get_nothing(self, client, alice, bob):
        session = self._long(alice, n=30)
        client.force_login(bob)
        assert client.get(reverse("sessions:events", args=[session.pk]) + "?before=10").status_code == 404


def test_the_glance_shows_plan_progress_phase_step_and_turns(alice_client, alice):
    from sessions.models import SessionState

    session = services.session_start(owner=alice, task="t", mode="planning_and_control", config={"max_turns": 5})
    plan = [
        {"number": 1, "agent": "researcher", "description": "Read <b>about</b> it", "status": "done"},
        {"number": 2, "agent": "engineer", "description": "Plot it", "status": "running"},
        {"number": 3, "agent": "engineer", "description": "Fit it", "status": "pending"},
    ]
    SessionState.objects.filter(pk=session.pk).update(
        plan=plan, current_phase="control", current_step=2, engine_state={"turns": 12, "continuations": 2}
    )
    html = alice_client.get(session.get_absolute_url()).content.decode()
    assert 'max="3" value="1"' in html and "Plan: 1 of 3 steps done" in html
    assert 'data-step="2" data-status="running"' in html and "Read &lt;b&gt;about&lt;/b&gt; it" in html
    assert re.search(r'data-testid="step">2 of 3<', html) and re.search(r'data-testid="phase">control<', html)
    assert re.search(r'data-testid="turns"[^>]*>12 <span class="muted">· budget 5 per run, continued 2×</span>', html)
    assert 'data-testid="elapsed"' in html


class TestSessionList:
    def _make(self, owner):
        made = {}
        for task, mode, status in [
            ("Fit the CMB power spectrum", "one_shot", "completed"),
            ("Plot a damped cosine", "planning_and_control", "failed"),
            ("Estimate <script>lensing</script> noise", "one_shot", "running"),
        ]:
            session = services.session_start(owner=owner, task=task, mode=mode)
            Session.objects.filter(pk=session.pk).update(status=status)
            made[task.split()[0]] = session
        return made

    @staticmethod
    def _rows(html):
        return re.findall(r'<tr id="session-row-([0-9a-f-]+)"', html)

    def test_filters_by_status_mode_and_search(self, alice_client, alice, bob):
        made = self._make(alice)
        services.session_start(owner=bob, task="Fit the CMB power spectrum too", mode="one_shot")
        url = reverse("sessions:list")
        assert len(self._rows(alice_client.get(url).content.decode())) == 3  # bob's is not listed
        assert self._rows(alice_client.get(url + "?status=failed").content.decode()) == [str(made["Plot"].pk)]
        assert set(self._rows(alice_client.get(url + "?mode=one_shot").content.decode())) == {str(made["Fit"].pk), str(made["Estimate"].pk)}
        assert self._rows(alice_client.get(url + "?q=power+SPECTRUM").content.decode()) == [str(made["Fit"].pk)]
        html = alice_client.get(url + "?q=%3Cscript%3E").content.decode()
        assert self._rows(html) == [str(made["Estimate"].pk)] and "<script>lensing" not in html
        assert "No sessions match these filters." in alice_client.get(url + "?q=nothing+like+this").content.decode()

    def test_unknown_filter_values_are_ignored_not_errors(self, alice_client, alice):
        self._make(alice)
        response = alice_client.get(reverse("sessions:list") + "?status=exploded&mode=%E2%98%83&page=zzz")
        assert response.status_code == 200 and len(self._rows(response.content.decode())) == 3

    def test_pages_keep_the_filters(self, alice_client, alice, settings):
        settings.MAX_LIVE_RUNS_PER_USER = 0  # 27 queued sessions at once
        for i in range(27):
            services.session_start(owner=alice, task=f"Task {i}", mode="one_shot")
        html = alice_client.get(reverse("sessions:list") + "?mode=one_shot").content.decode()
        assert len(self._rows(html)) == 25 and 'href="?mode=one_shot&amp;page=2"' in html and "27 sessions" in html
        assert len(self._rows(alice_client.get(reverse("sessions:list") + "?mode=one_shot&page=2").content.decode())) == 2

    def test_htmx_filtering_returns_only_the_rows(self, alice_client, alice):
        self._make(alice)
        html = alice_client.get(reverse("sessions:list") + "?status=completed", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="session-rows").content.decode()
        assert html.lstrip().startswith('<div id="session-rows">') and "<html" not in html and len(self._rows(html)) == 1


class TestExport:
    def _session(self, owner):
        from orchestrator.engine.events import EngineEvent, EventKind

        session = services.session_start(owner=owner, task="Fit <b>it</b>", mode="one_shot")
        for event in [
            EngineEvent(EventKind.MESSAGE, agent="engineer", content="Here is ```` a fence breaker\n# heading", prompt_tokens=5, completion_tokens=2),
            EngineEvent(EventKind.TOOL_RESULT, agent="executor", content="```\nout\n```", data={"name": "execute_code"}),
            EngineEvent(EventKind.DECISION, agent="human", content="x", data={"decision": "approve", "by": "alice", "request": "plan", "feedback": "ok"}),
        ]:
            services.event_append(session_id=session.pk, run_id=None, event=event)
        return session

    def _body(self, response) -> str:
        return b"".join(response.streaming_content).decode()

    def test_json_has_every_event_in_order(self, alice_client, alice):
        session = self._session(alice)
        response = alice_client.get(reverse("sessions:export", args=[session.pk, "json"]))
        assert response["Content-Type"] == "application/json"
        assert response["Content-Disposition"] == f'attachment; filename="session-{session.pk}.json"'
        data = json.loads(self._body(response))
        assert data["session"]["task"] == "Fit <b>it</b>" and data["session"]["events"] == 4
        assert [e["seq"] for e in data["events"]] == [1, 2, 3, 4]
        assert data["events"][1]["content"].startswith("Here is ````") and data["events"][1]["prompt_tokens"] == 5
        assert data["session"]["usage"] == {"engineer": {"prompt": 5, "completion": 2, "cost": 0.0}}

    def test_markdown_has_every_event_and_fences_hold(self, alice_client, alice):
        session = self._session(alice)
        response = alice_client.get(reverse("sessions:export", args=[session.pk, "md"]))
        assert response["Content-Type"].startswith("text/markdown")
        body = self._body(response)
        assert body.startswith("# Fit <b>it</b>\n") and "## Task\n\nFit <b>it</b>" in body
        assert [int(n) for n in re.findall(r"^#### (\d+) · ", body, re.M)] == [1, 2, 3, 4]
        assert "````\n```\nout\n```\n````" in body  # the output's own fence cannot end the block
        assert "**Decision: approve** by alice on the plan request\n\n> ok" in body

    def test_others_and_unknown_formats_get_404(self, client, alice, bob):
        session = self._session(alice)
        client.force_login(bob)
        assert client.get(reverse("sessions:export", args=[session.pk, "json"])).status_code == 404
        client.force_login(alice)
        assert client.get(reverse("sessions:export", args=[session.pk, "pdf"])).status_code == 404


def test_human_in_the_loop_options_reach_the_session_config(alice_client, alice):
    response = alice_client.post(reverse("sessions:new"), {"task": "t", "mode": "copilot", "approve_code": "on", "chat": "on"})
    assert response.status_code == 302
    assert Session.objects.get(owner=alice).config == {"approve_code": True, "chat": True}


def test_chat_outside_copilot_is_refused(alice_client, alice):
    response = alice_client.post(reverse("sessions:new"), {"task": "t", "mode": "one_shot", "chat": "on"})
    assert response.status_code == 400 and "Chat is a copilot-mode option" in response.content.decode()
    assert not Session.objects.exists()


def test_a_copilot_chat_turn_is_a_message_box_on_the_page(alice_client, alice):
    from tests.approvals.helpers import waiting_session

    session = waiting_session(alice, kind="copilot_turn")
    html = alice_client.get(session.get_absolute_url()).content.decode()
    assert "Your next message to the team" in html and 'data-decision="reply"' in html and 'data-decision="finish"' in html


def test_an_approval_event_reads_in_words_with_its_buttons_answers(alice_client, alice):
    """The transcript names a request's kind in words and its answers as the card's buttons say them."""
    from orchestrator.engine.events import EngineEvent, EventKind

    session = services.session_start(owner=alice, task="Chat about the spectrum", mode="copilot")
    services.event_append(
        session_id=session.pk, run_id=None,
        event=EngineEvent(EventKind.APPROVAL, content="Your turn: ask the team.", data={"request": "copilot_turn", "options": ["reply", "finish"]}),
    )
    body = alice_client.get(session.get_absolute_url()).content.decode()
    assert "copilot turn request" in body and "copilotturn" not in body
    assert "Answers: Send, Finish" in body


def test_skipped_steps_are_counted_apart_and_statuses_read_as_words(alice_client, alice):
    from orchestrator.engine.events import EngineEvent, EventKind
    from sessions.models import SessionState

    session = services.session_start(owner=alice, task="t", mode="planning_and_control")
    plan = [
        {"number": 1, "agent": "researcher", "description": "Read", "status": "done"},
        {"number": 2, "agent": "engineer", "description": "Plot", "status": "skipped"},
        {"number": 3, "agent": "engineer", "description": "Fit", "status": "done"},
    ]
    SessionState.objects.filter(pk=session.pk).update(plan=plan)
    services.event_append(session_id=session.pk, run_id=None, event=EngineEvent(EventKind.STATUS, content="waiting", data={"status": "waiting_approval"}))
    html = alice_client.get(session.get_absolute_url()).content.decode()
    assert "Plan: 2 of 3 steps done, 1 skipped" in html and 'max="3" value="3"' in html
    assert '<span class="badge badge--waiting_approval">Waiting for approval</span>' in html
