"""Security, server side: who gets what on every route and socket, CSRF, socket origins,
session fixation and logout, secrets in pages and logs, oversized input.

The permission matrix is a table keyed by route: every URL pattern of the app's own
namespaces, the site-wide routes, and every admin page and admin action of the project's
models is discovered from the resolver (and the sockets from the ASGI router), and the
discovered set must equal the table's keys, so a route added later fails here until it
is classified.

Roles: anonymous, another user (owns nothing), staff without the approvals permission,
staff with it, a superuser, and the owner.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from tests.communicator import WebsocketCommunicator
from django.apps import apps
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.contrib.sessions.backends.db import SessionStore
from django.db import transaction
from django.test import Client
from django.urls import URLResolver, get_resolver, reverse

from approvals.models import ApprovalRequest, LegacyApproval
from approvals.services import REJECTING
from cmbagent_site.asgi import application
from sessions import services
from sessions.consumers import MAX_FRAME
from sessions.models import Event, Run, Session, SessionState
from tests.approvals.helpers import waiting_session
from tests.sessions.test_consumers import _closed_with, _communicator, _cookie_for

ROLES = ("anonymous", "other", "staff", "approver", "superuser", "owner")
PROJECT_APPS = ("sessions", "approvals", "orchestrator", "cmbagent_site")  # app *names*; sessions' label is agent_sessions
TASK = "Plot a damped cosine"  # the task of tests.approvals.helpers.waiting_session
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


# --- people and the world they act on -----------------------------------------------


@pytest.fixture
def people(django_user_model, alice, bob, approver):
    staff = django_user_model.objects.create_user("dave", password="x-Pa55word!", is_staff=True)
    # Admin access to the approval models (view and change), but not the approvals permission
    # and nothing on the session models.
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_approvalrequest", "change_approvalrequest", "view_legacyapproval"])
    )
    root = django_user_model.objects.create_superuser("root", password="root-Pa55word!")
    return {"anonymous": None, "other": bob, "staff": staff, "approver": approver, "superuser": root, "owner": alice}


@dataclass
class World:
    people: dict
    session: Session  # alice's, waiting for a plan approval
    request: ApprovalRequest  # its pending plan request
    legacy: LegacyApproval  # an imported pending record attached to it
    event: Event
    made: dict = field(default_factory=dict)

    def reloaded(self) -> World:
        """The same rows, read again (after a rolled-back role), with nothing made yet."""
        return World(
            people=self.people, session=Session.objects.get(pk=self.session.pk), request=ApprovalRequest.objects.get(pk=self.request.pk),
            legacy=LegacyApproval.objects.get(pk=self.legacy.pk), event=Event.objects.get(pk=self.event.pk),
        )

    def for_action(self, action: str) -> Session:
        """A session of alice's in the status where ``action`` applies (made once per test)."""
        if action not in self.made:
            alice = self.people["owner"]
            if action == "cancel":
                session = self.session
            elif action == "continue":
                session = waiting_session(alice, kind="budget")  # paused, with a pending round-budget request
            else:
                session = services.session_start(owner=alice, task=f"For {action}", mode="one_shot")
                if action == "resume":
                    services.session_suspend(session_id=session.pk, user=alice)
                elif action == "retry":
                    run = services.run_claim(worker_id="w-sec", lease_seconds=30, run_id=session.runs.get().pk)
                    services.run_finish(run_id=run.pk, worker_id=run.lease_owner, status="failed", detail="boom")
            session.refresh_from_db()
            self.made[action] = session
        return self.made[action]


@pytest.fixture
def world(people, alice, settings):
    settings.MAX_LIVE_RUNS_PER_USER = 0
    session = waiting_session(alice)
    folder = Path(settings.RUNS_DIR) / str(session.pk)
    folder.mkdir(parents=True)
    (folder / "plot.png").write_bytes(PNG)
    legacy = LegacyApproval.objects.create(
        legacy_id="legacy-sec-1", generation="legacy", approval_type="plan_approval", status="pending", session=session,
        context_snapshot={"message": "Approve the imported plan?"},
    )
    return World(
        people=people, session=session, request=ApprovalRequest.objects.get(session=session), legacy=legacy,
        event=Event.objects.filter(session=session).latest("seq"),
    )


def snapshot() -> dict:
    """Everything a state change could touch (not the auth sessions: logging in writes those)."""
    return {
        "sessions": sorted((str(pk), owner, status, seq) for pk, owner, status, seq in Session.objects.values_list("pk", "owner_id", "status", "last_seq")),
        "runs": sorted(Run.objects.values_list("pk", "status")),
        "events": sorted(Event.objects.values_list("pk", "seq")),
        "states": sorted((str(pk), v) for pk, v in SessionState.objects.values_list("pk", "version")),
        "requests": sorted(
            (str(r.pk), r.status, r.decision, r.decided_by_id, len(r.audit)) for r in ApprovalRequest.objects.all()
        ),
        "legacy": sorted(LegacyApproval.objects.values_list("pk", "status", "migrated_to_id")),
    }


# --- outcomes ------------------------------------------------------------------------

LOGIN = "login"  # 302 to /login/?next=…
ADMIN_LOGIN = "admin-login"  # 302 to /admin/login/?next=…


@dataclass(frozen=True)
class To:
    """A 302 to exactly this place."""

    target: Callable[[World, Any], str]


@dataclass(frozen=True)
class Did:
    """This outcome, and the case's effect happened (without Did, nothing in the database may change)."""

    outcome: Any


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    url: Callable[[World], str]
    expect: dict
    data: Callable[[World], dict] = lambda w: {}
    effect: Callable[[World, Any, Client, dict], bool] | None = None


def by_role(default, **overrides) -> dict:
    assert set(overrides) <= set(ROLES), overrides
    return {role: overrides.get(role, default) for role in ROLES}


def admin_roles(staff, approver, superuser) -> dict:
    """Admin pages: everyone who is not staff is sent to the admin's login."""
    return by_role(ADMIN_LOGIN, staff=staff, approver=approver, superuser=superuser)


def _logged_out(w, user, client, before) -> bool:
    return "_auth_user_id" not in client.session


def _logged_in_as_alice(w, user, client, before) -> bool:
    return client.session.get("_auth_user_id") == str(w.people["owner"].pk)


def _new_session_of(w, user, client, before) -> bool:
    return len(snapshot()["sessions"]) == len(before["sessions"]) + 1 and Session.objects.filter(owner=user, task="Secure task").count() == 1


def _decided_by(door: str):
    def check(w, user, client, before) -> bool:
        w.request.refresh_from_db()
        return (w.request.status, w.request.decided_by, w.request.door) == ("decided", user, door)

    return check


def _status_of(action: str, status: str):
    def check(w, user, client, before) -> bool:
        return Session.objects.get(pk=w.for_action(action).pk).status == status

    return check


def _gone(model, pk_of):
    def check(w, user, client, before) -> bool:
        return not model.objects.filter(pk=pk_of(w)).exists()

    return check


def _session_url(name: str, *extra):
    return lambda w: reverse(name, args=[w.session.pk, *extra])


# --- the route table -----------------------------------------------------------------

OWNER_ONLY = by_role(404, anonymous=LOGIN, owner=200)  # someone else's session looks exactly like a missing one
# Staff who decide every session's approval requests also see those sessions (the queue links to them); to
# anyone else, someone else's session looks exactly like a missing one. Its controls stay OWNER_ONLY.
WATCHERS = by_role(404, anonymous=LOGIN, owner=200, approver=200, superuser=200)
LOGGED_IN = by_role(200, anonymous=LOGIN)
NOT_ALLOWED = by_role(405)


def _action_cases(actions=("continue", "suspend", "resume", "retry", "cancel"), route="sessions:action"):
    result = {
        "continue": "queued", "suspend": "suspended", "resume": "queued", "retry": "queued", "cancel": "cancelled",
    }
    cases = []
    for action in actions:
        args = (lambda a: (lambda w: [w.for_action(a).pk, a]))(action) if route == "sessions:action" else (lambda w: [w.for_action("continue").pk])
        url = (lambda r, f: (lambda w: reverse(r, args=f(w))))(route, args)
        detail = (lambda a: To(lambda w, u: w.for_action(a).get_absolute_url()))(action)
        cases.append(
            Case(f"POST {action}", "POST", url, by_role(404, anonymous=LOGIN, owner=Did(detail)), effect=_status_of(action, result[action]))
        )
    return cases


ROUTES: dict[str, list[Case]] = {
    # Site-wide
    "path:": [Case("GET", "GET", lambda w: "/", by_role(To(lambda w, u: "/sessions/")))],
    "login": [
        Case("GET", "GET", lambda w: reverse("login"), by_role(To(lambda w, u: "/sessions/"), anonymous=200)),
        Case(
            "POST alice's credentials", "POST", lambda w: reverse("login"),
            by_role(To(lambda w, u: "/sessions/"), anonymous=Did(To(lambda w, u: "/sessions/"))),
            data=lambda w: {"username": "alice", "password": "alice-pass-123"}, effect=_logged_in_as_alice,
        ),
    ],
    "login-link": [Case("GET a forged token", "GET", lambda w: reverse("login-link", args=["MQ", "forged-token"]), by_role(400))],
    "logout": [
        Case("GET", "GET", lambda w: reverse("logout"), NOT_ALLOWED),  # Django 5: LogoutView is POST-only
        Case("POST", "POST", lambda w: reverse("logout"), by_role(Did(To(lambda w, u: "/login/")), anonymous=To(lambda w, u: "/login/")), effect=_logged_out),
    ],
    "healthz": [Case("GET", "GET", lambda w: "/healthz", by_role(200)), Case("POST", "POST", lambda w: "/healthz", NOT_ALLOWED)],
    # Sessions
    "sessions:list": [Case("GET", "GET", lambda w: reverse("sessions:list"), LOGGED_IN)],
    "sessions:new": [
        Case("GET", "GET", lambda w: reverse("sessions:new"), LOGGED_IN),
        Case(
            "POST", "POST", lambda w: reverse("sessions:new"),
            by_role(Did(To(lambda w, u: Session.objects.filter(owner=u).latest("created_at").get_absolute_url())), anonymous=LOGIN),
            data=lambda w: {"task": "Secure task", "mode": "one_shot"}, effect=_new_session_of,
        ),
    ],
    "sessions:detail": [Case("GET", "GET", _session_url("sessions:detail"), WATCHERS)],
    "sessions:continue": [
        Case("GET", "GET", _session_url("sessions:continue"), NOT_ALLOWED),
        *_action_cases(("continue",), route="sessions:continue"),
    ],
    "sessions:events": [Case("GET", "GET", lambda w: reverse("sessions:events", args=[w.session.pk]) + "?before=3", WATCHERS)],
    "sessions:export": [
        Case("GET md", "GET", _session_url("sessions:export", "md"), WATCHERS),
        Case("GET json", "GET", _session_url("sessions:export", "json"), WATCHERS),
        Case("GET unknown format", "GET", _session_url("sessions:export", "exe"), by_role(404, anonymous=LOGIN)),
    ],
    "sessions:file": [Case("GET", "GET", _session_url("sessions:file", "plot.png"), WATCHERS)],
    "sessions:action": [
        Case("GET cancel", "GET", _session_url("sessions:action", "cancel"), NOT_ALLOWED),
        *_action_cases(),
        Case("POST unknown action", "POST", _session_url("sessions:action", "explode"), by_role(404, anonymous=LOGIN)),
    ],
    # Approvals
    "approvals:queue": [Case("GET", "GET", lambda w: reverse("approvals:queue"), by_role(404, anonymous=LOGIN, approver=200, superuser=200))],
    "approvals:decide": [
        Case("GET", "GET", lambda w: reverse("approvals:decide", args=[w.request.pk]), NOT_ALLOWED),
        Case(
            "POST approve", "POST", lambda w: reverse("approvals:decide", args=[w.request.pk]),
            by_role(404, anonymous=LOGIN, **{r: Did(To(lambda w, u: w.session.get_absolute_url())) for r in ("approver", "superuser", "owner")}),
            data=lambda w: {"decision": "approve"}, effect=_decided_by("session_page"),
        ),
    ],
}


# The admin: per model, its pages (GET; POST where the page changes something) and its actions.
ADMIN_OBJECTS = {
    "approvals.approvalrequest": lambda w: w.request.pk,
    "approvals.legacyapproval": lambda w: w.legacy.pk,
    "agent_sessions.session": lambda w: w.session.pk,
    "agent_sessions.event": lambda w: w.event.pk,
    "agent_sessions.sessionstate": lambda w: w.session.pk,
}
# (staff, approver, superuser) for each page; "change" POST and "add" POST are empty forms (a refusal, or the
# form again with its errors), "delete" POST confirms.
_APPROVAL_PAGES = {
    "changelist": (200, 200, 200), "add": (403, 403, 403), "add POST": (403, 403, 403), "change": (200, 200, 200),
    "change POST": (403, 403, 403), "delete": (403, 403, 403), "delete POST": (403, 403, 403), "history": (200, 200, 200),
}


def _deleted(label):
    # Back to the changelist, or to the admin's index for a model no one may change (the event log, the saved state).
    back = "admin:index" if label in ("agent_sessions.event", "agent_sessions.sessionstate") else f"admin:{label.replace('.', '_')}_changelist"
    return Did(To(lambda w, u: reverse(back)))


_SESSION_PAGES = {
    "changelist": (403, 403, 200), "add": (403, 403, 200), "add POST": (403, 403, 200), "change": (403, 403, 200),
    "change POST": (403, 403, 200), "delete": (403, 403, 200), "delete POST": (403, 403, "deleted"), "history": (403, 403, 200),
}
# A session with approval requests cannot be deleted, not even by a superuser: the cascade would
# take requests nobody may delete (the audit trail stays).
_SESSION_WITH_REQUESTS = {**_SESSION_PAGES, "delete POST": (403, 403, 403)}
# Shown, not added or edited by hand.
_VIEW_ONLY = {**_SESSION_PAGES, "add": (403, 403, 403), "add POST": (403, 403, 403), "change POST": (403, 403, 403)}
ADMIN_PAGES = {
    "approvals.approvalrequest": _APPROVAL_PAGES,
    "approvals.legacyapproval": _APPROVAL_PAGES,
    # Sessions are started by the form, not added in the admin; their fields but the title are read-only there.
    "agent_sessions.session": {**_SESSION_WITH_REQUESTS, "add": (403, 403, 403), "add POST": (403, 403, 403)},
    # The log is append-only in the admin: no add, no change, no delete (view only; a session is deleted whole).
    "agent_sessions.event": {**_VIEW_ONLY, "delete": (403, 403, 403), "delete POST": (403, 403, 403)},
    # The saved engine state is shown, not edited or added by hand (a hand edit is a tampered checkpoint).
    "agent_sessions.sessionstate": _VIEW_ONLY,
}
_changelist_of = lambda label: (lambda w, u: reverse(f"admin:{label.replace('.', '_')}_changelist"))  # noqa: E731
# Actions: POSTed to the changelist with the object selected. Staff without the permission are
# not offered the approval actions: the post is answered with the changelist again, nothing done.
ADMIN_ACTIONS = {
    "approvals.approvalrequest": {
        "approve": ((200, "did", "did"), _decided_by("admin")),
        "reject": ((200, "did", "did"), lambda w, u, c, b: (w.request.refresh_from_db() or True) and w.request.decision == REJECTING[w.request.kind]),
        "expire": ((200, "did", "did"), lambda w, u, c, b: (w.request.refresh_from_db() or True) and w.request.audit[-1]["what"] == "expired"),
        "cancel": ((200, "did", "did"), lambda w, u, c, b: (w.request.refresh_from_db() or True) and w.request.status == "cancelled"),
        # Offered to nobody: the audit trail stays.
        "delete_selected": ((200, "refused", "refused"), None),
    },
    "approvals.legacyapproval": {
        "resolve_through_service": ((200, "did", "did"), lambda w, u, c, b: LegacyApproval.objects.get(pk=w.legacy.pk).migrated_to_id is not None),
        "migrate_to_current": ((200, "did", "did"), lambda w, u, c, b: LegacyApproval.objects.get(pk=w.legacy.pk).migrated_to_id is not None),
        "delete_selected": ((200, "refused", "refused"), None),
    },
    "agent_sessions.session": {"delete_selected": ((403, 403, 403), None)},  # as its delete page
    "agent_sessions.event": {"delete_selected": ((403, 403, 200), None)},  # no action offered: the changelist again, nothing deleted
    "agent_sessions.sessionstate": {"delete_selected": ((403, 403, "did"), _gone(SessionState, lambda w: w.session.pk))},
}


def _admin_page_cases(label: str) -> dict[str, list[Case]]:
    prefix = f"admin:{label.replace('.', '_')}"
    pk_of = ADMIN_OBJECTS[label]
    model = apps.get_model(label)
    cases: dict[str, list[Case]] = {}
    for page, outcomes in ADMIN_PAGES[label].items():
        view, _, post = page.partition(" ")
        method = "POST" if post else "GET"
        args = (lambda p: (lambda w: [p(w)]))(pk_of) if view in ("change", "delete", "history") else (lambda w: [])
        url = (lambda name, a: (lambda w: reverse(name, args=a(w))))(f"{prefix}_{view}", args)
        expected = [_deleted(label) if o == "deleted" else o for o in outcomes]
        effect = _gone(model, pk_of) if "deleted" in outcomes else None
        data = (lambda w: {"post": "yes"}) if page == "delete POST" else (lambda w: {})
        cases.setdefault(f"{prefix}_{view}", []).append(Case(page if post else "GET", method, url, admin_roles(*expected), data=data, effect=effect))
    return cases


def _admin_action_cases(label: str) -> dict[str, list[Case]]:
    prefix = f"admin:{label.replace('.', '_')}"
    pk_of = ADMIN_OBJECTS[label]
    cases = {}
    for action, (outcomes, effect) in ADMIN_ACTIONS[label].items():
        back = To(_changelist_of(label))
        expected = [Did(back) if o == "did" else back if o == "refused" else o for o in outcomes]
        data = (lambda a, p: (lambda w: {"action": a, "_selected_action": [str(p(w))], "post": "yes"}))(action, pk_of)
        url = (lambda n: (lambda w: reverse(n)))(f"{prefix}_changelist")
        cases[f"admin-action:{label}:{action}"] = [Case(f"POST {action}", "POST", url, admin_roles(*expected), data=data, effect=effect)]
    return cases


for _label in ADMIN_OBJECTS:
    ROUTES.update(_admin_page_cases(_label))
    ROUTES.update(_admin_action_cases(_label))


# --- discovery -----------------------------------------------------------------------


def _project_labels() -> set[str]:
    return {config.label for config in apps.get_app_configs() if config.name in PROJECT_APPS}


def discovered_routes() -> set[str]:
    """Every route this file must classify: the app's namespaces and site-wide routes, and the
    admin pages and actions of the project's own models."""
    labels = _project_labels()
    admin_prefixes = tuple(
        f"{model._meta.app_label}_{model._meta.model_name}_" for model in admin.site._registry if model._meta.app_label in labels
    )
    found: set[str] = set()

    def walk(patterns, prefix: str, namespace: str | None) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern), pattern.namespace or namespace)
            elif namespace == "admin":
                if pattern.name and pattern.name.startswith(admin_prefixes):
                    found.add(f"admin:{pattern.name}")
            elif namespace is not None:
                assert pattern.name, f"unnamed route {prefix}{pattern.pattern} in namespace {namespace}"
                found.add(f"{namespace}:{pattern.name}")
            else:
                found.add(pattern.name or f"path:{prefix}{pattern.pattern}")

    walk(get_resolver().url_patterns, "", None)
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label in labels:
            for _, name, _ in model_admin._get_base_actions():
                found.add(f"admin-action:{model._meta.label_lower}:{name}")
    return found


def socket_routes() -> list[str]:
    app = application.application_mapping["websocket"]
    while not isinstance(app, URLRouter):
        app = getattr(app, "application", None) or app.inner
    routes = []
    for route in app.routes:
        assert not isinstance(getattr(route, "callback", None), URLRouter), "nested socket routers: classify them here"
        routes.append(str(route.pattern))
    return routes


def test_every_route_is_classified():
    """A route added without a row in the table (or a row for a route that is gone) fails here."""
    found = discovered_routes()
    assert found == set(ROUTES), f"unclassified: {sorted(found - set(ROUTES))}; stale: {sorted(set(ROUTES) - found)}"
    assert set(socket_routes()) == set(SOCKETS)


# --- the HTTP matrix -----------------------------------------------------------------


def _client(user, **kwargs) -> Client:
    client = Client(**kwargs)
    if user is not None:
        client.force_login(user)
    return client


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def _check(response, outcome, w: World, user, where: str) -> None:
    location = response.get("Location", "")
    if outcome == LOGIN:
        assert response.status_code == 302 and location.startswith("/login/?next="), (where, response.status_code, location)
    elif outcome == ADMIN_LOGIN:
        assert response.status_code == 302 and location.startswith("/admin/login/?next="), (where, response.status_code, location)
    elif isinstance(outcome, To):
        assert (response.status_code, location) == (302, outcome.target(w, user)), where
    else:
        assert response.status_code == outcome, (where, response.status_code, location, _body(response)[:300])


def _request(client: Client, case: Case, w: World, url: str | None = None):
    url = url or case.url(w)
    return client.get(url) if case.method == "GET" else client.post(url, case.data(w))


MATRIX = [pytest.param(key, index, id=f"{key}|{case.name}") for key, cases in ROUTES.items() for index, case in enumerate(cases)]


def _one_role(w: World, key: str, case: Case, role: str) -> None:
    user = w.people[role]
    client = _client(user)
    url = case.url(w)
    before = snapshot()
    response = _request(client, case, w, url)
    expected = case.expect[role]
    outcome = expected.outcome if isinstance(expected, Did) else expected
    _check(response, outcome, w, user, f"{case.method} {url}")
    if isinstance(expected, Did):
        assert case.effect(w, user, client, before), f"{case.method} {url}: no effect"
    else:
        assert snapshot() == before, f"{case.method} {url} changed something"
    body = _body(response)
    if key.startswith("sessions:") and role != "owner" and outcome != 200:
        # Nothing of alice's session reaches anyone else it does not let in (the approvers watch it):
        # not its id, not its task.
        assert TASK.encode() not in body and str(w.session.pk).encode() not in body
    if outcome == 404:
        # Someone else's session (or request) answers exactly as a missing one does.
        ids = [str(pk) for pk in Session.objects.values_list("pk", flat=True)] + [str(w.request.pk)]
        real = next((i for i in ids if i in url), None)
        if real:
            missing = str(uuid.uuid4())
            other = _request(client, case, w, url.replace(real, missing))
            assert other.status_code == 404
            assert _body(other).replace(missing.encode(), b"ID") == body.replace(real.encode(), b"ID")


@pytest.mark.django_db
@pytest.mark.parametrize("key, index", MATRIX)
def test_route_matrix(world, key, index):
    """One route (and method) for each of the six roles, each in a savepoint rolled back after it:
    every role meets the same world."""
    case = ROUTES[key][index]
    failures = []
    for role in ROLES:
        try:
            with transaction.atomic():
                _one_role(world.reloaded(), key, case, role)
                transaction.set_rollback(True)
        except AssertionError as exc:
            failures.append(f"{role}: {exc}")
    assert not failures, "\n".join(failures)


# --- the socket matrix ---------------------------------------------------------------

OPEN = "open"
SOCKETS = {
    r"^ws/sessions/$": by_role(OPEN, anonymous=4401),
    # A session that is not yours closes as an unknown one does (4403), unless you decide every session's
    # approval requests; a malformed id is 4404.
    r"^ws/sessions/(?P<session_id>[^/]{1,64})/$": by_role(4403, anonymous=4401, owner=OPEN, approver=OPEN, superuser=OPEN),
    r"^ws/approvals/$": by_role(4403, anonymous=4401, approver=OPEN, superuser=OPEN),
}


def _socket_path(pattern: str, session_id) -> str:
    return "/" + re.sub(r"\(\?P<session_id>[^)]*\)", str(session_id), pattern).strip("^$")


async def _opened(communicator: WebsocketCommunicator, path: str) -> None:
    connected, _ = await communicator.connect()
    assert connected, path
    if path == "/ws/approvals/":
        assert 'id="approval-rows"' in await communicator.receive_from(timeout=5)
    elif path != "/ws/sessions/":
        await communicator.send_json_to({"type": "hello", "after": 0})
        assert 'data-seq="1"' in await communicator.receive_from(timeout=5)
    assert await communicator.receive_nothing(timeout=0.1)  # still open: no close frame
    await communicator.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", ROLES)
async def test_socket_matrix(people, alice, role):
    session = await database_sync_to_async(waiting_session)(alice)
    user = people[role]
    cookie = await database_sync_to_async(_cookie_for)(user) if user is not None else None
    for pattern, expected in SOCKETS.items():
        path = _socket_path(pattern, session.pk)
        if expected[role] == OPEN:
            await _opened(_communicator(path, cookie=cookie), path)
        else:
            assert await _closed_with(_communicator(path, cookie=cookie)) == expected[role], (path, role)
    if user is not None:
        # A well-formed unknown session and a malformed id.
        assert await _closed_with(_communicator(f"/ws/sessions/{uuid.uuid4()}/", cookie=cookie)) == 4403
        assert await _closed_with(_communicator("/ws/sessions/nope/", cookie=cookie)) == 4404


# --- CSRF on every state change --------------------------------------------------------

ROLE_PREFERENCE = ("owner", "approver", "superuser", "staff", "other", "anonymous")
POST_CASES = [
    pytest.param(key, index, id=f"{key}|{case.name}")
    for key, cases in ROUTES.items()
    for index, case in enumerate(cases)
    if case.method == "POST"
]


def _acting_role(case: Case, key: str) -> str:
    """The role for whom this POST does something; else the one who gets furthest."""
    for role in ROLE_PREFERENCE:
        if isinstance(case.expect[role], Did):
            return role
    return "superuser" if key.startswith("admin") else "owner"


@pytest.mark.django_db
@pytest.mark.parametrize("key, index", POST_CASES)
def test_every_post_needs_the_csrf_token(world, key, index):
    case = ROUTES[key][index]
    role = _acting_role(case, key)
    user = world.people[role]
    client = _client(user, enforce_csrf_checks=True)
    client.get(reverse("login") if user is None else reverse("sessions:new"))  # the browser has the CSRF cookie...
    token = client.cookies["csrftoken"].value
    url = case.url(world)
    before = snapshot()
    refusals = [
        ({}, {}),  # ...but the forged page cannot read it: no token in the form
        ({"csrfmiddlewaretoken": "x" * 64}, {}),  # a wrong token
        ({"csrfmiddlewaretoken": token}, {"HTTP_ORIGIN": "http://evil.example"}),  # the right token from a foreign origin
    ]
    for extra, headers in refusals:
        response = client.post(url, {**case.data(world), **extra}, **headers)
        assert response.status_code == 403 and b"CSRF verification failed" in response.content, (url, extra, headers)
        assert snapshot() == before, f"{url}: a refused POST changed something"
        assert ("_auth_user_id" in client.session) == (user is not None), "the refused POST changed who is logged in"
    expected = case.expect[role]
    if isinstance(expected, Did):
        # The same POST with the token does what it is for: the token was the only thing missing.
        response = client.post(url, {**case.data(world), "csrfmiddlewaretoken": token}, HTTP_ORIGIN="http://testserver")
        _check(response, expected.outcome, world, user, f"POST {url} with token")
        assert case.effect(world, user, client, before)


@pytest.mark.django_db
def test_a_session_left_to_staff_is_not_decided_by_its_owner(people, alice, approver):
    """With ``owner_decides: false`` the owner may not decide their own session's request: 403, nothing written; staff may."""
    session = waiting_session(alice, config={"owner_decides": False})
    request = ApprovalRequest.objects.get(session=session)
    url = reverse("approvals:decide", args=[request.pk])
    before = snapshot()
    response = _client(alice).post(url, {"decision": "approve"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 403 and "You may not decide this request." in response.content.decode()
    assert snapshot() == before
    assert _client(approver).post(url, {"decision": "approve", "door": "staff_queue"}).status_code == 302
    request.refresh_from_db()
    assert (request.status, request.decided_by, request.door) == ("decided", approver, "staff_queue")


def test_csrf_covers_every_post_route():
    """Each POST route of the table is in the CSRF test, with a role for whom it works (bar the refused ones)."""
    posted = {key for key, cases in ROUTES.items() if any(c.method == "POST" for c in cases)}
    assert {p.values[0] for p in POST_CASES} == posted
    state_changes = {"sessions:new", "sessions:continue", "sessions:action", "approvals:decide", "logout", "login"}
    assert state_changes <= posted
    assert all(any(isinstance(c.expect[r], Did) for r in ROLES) for key in state_changes for c in ROUTES[key] if c.method == "POST" and "unknown" not in c.name)


# --- origin check on every socket ------------------------------------------------------

FOREIGN = [b"http://evil.example", b"null", b"http://localhost.evil.example", b"http://evil.example:8000", b"file://"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("origin", [*FOREIGN, None], ids=[o.decode() for o in FOREIGN] + ["missing"])
async def test_sockets_refuse_foreign_and_missing_origins(people, alice, approver, origin):
    """Even for a user who may open the socket: 4403, before auth or routing; with a good origin it opens."""
    session = await database_sync_to_async(waiting_session)(alice)
    for pattern in SOCKETS:
        path = _socket_path(pattern, session.pk)
        user = approver if "approvals" in path else alice
        cookie = await database_sync_to_async(_cookie_for)(user)
        headers = [(b"cookie", cookie)] + ([(b"origin", origin)] if origin is not None else [])
        assert await _closed_with(WebsocketCommunicator(application, path, headers=headers)) == 4403, (path, origin)
        # Control: the same user and cookie from the app's own origin get in.
        await _opened(_communicator(path, cookie=cookie, origin=b"http://localhost:8000"), path)


# --- session fixation and logout -------------------------------------------------------


def _form_token(html: bytes) -> str:
    return re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1).decode()


@pytest.mark.django_db
def test_login_rotates_a_planted_session_key(alice):
    """An attacker's session key, planted in the victim's browser before login, is worth nothing after it."""
    planted = SessionStore()
    planted["planted"] = True
    planted.create()
    client = Client(enforce_csrf_checks=True)
    client.cookies["sessionid"] = planted.session_key
    page = client.get(reverse("login"))
    csrf_before = client.cookies["csrftoken"].value
    response = client.post(
        reverse("login"),
        {"username": "alice", "password": "alice-pass-123", "csrfmiddlewaretoken": _form_token(page.content), "next": "http://evil.example/"},
    )
    assert (response.status_code, response["Location"]) == (302, "/sessions/")  # and no open redirect through next
    after = client.cookies["sessionid"].value
    assert after != planted.session_key
    assert not SessionStore().exists(planted.session_key)  # the old key is gone from the store
    assert client.cookies["csrftoken"].value != csrf_before  # the CSRF secret rotates at login too
    attacker = Client()
    attacker.cookies["sessionid"] = planted.session_key
    assert attacker.get(reverse("sessions:list"))["Location"].startswith("/login/")
    assert client.get(reverse("sessions:list")).status_code == 200


@pytest.mark.django_db(transaction=True)
async def test_logout_is_a_post_and_ends_the_session_for_pages_and_sockets(alice):
    session = await database_sync_to_async(waiting_session)(alice)
    client = Client(enforce_csrf_checks=True)
    await database_sync_to_async(client.force_login)(alice)
    old = client.cookies["sessionid"].value
    cookie = f"sessionid={old}".encode()
    get = database_sync_to_async(client.get)

    assert (await get(reverse("logout"))).status_code == 405  # Django 5: no logout by GET (an <img> could do it)
    token = _form_token((await get(reverse("sessions:new"))).content)
    assert (await database_sync_to_async(client.post)(reverse("logout"))).status_code == 403  # nor without the token
    assert (await get(reverse("sessions:list"))).status_code == 200  # still logged in
    await _opened(_communicator(f"/ws/sessions/{session.pk}/", cookie=cookie), f"/ws/sessions/{session.pk}/")

    response = await database_sync_to_async(client.post)(reverse("logout"), {"csrfmiddlewaretoken": token})
    assert (response.status_code, response["Location"]) == (302, "/login/")

    replay = Client()
    replay.cookies["sessionid"] = old
    for url in (reverse("sessions:list"), session.get_absolute_url(), reverse("sessions:export", args=[session.pk, "json"])):
        response = await database_sync_to_async(replay.get)(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url
    for path in (f"/ws/sessions/{session.pk}/", "/ws/sessions/", "/ws/approvals/"):
        assert await _closed_with(_communicator(path, cookie=cookie)) == 4401, path


# --- no secrets in pages or logs -------------------------------------------------------

SECRET_KEY = "django-secret-CANARY-3b1f0e9d7c5a1122"
API_KEY = "sk-CANARY-openai-9f8e7d6c5b4a3322"
WRONG_PASSWORD = "Wrong-Pa55-CANARY-2c4e6a8b"
ENV_DUMP = "import os\nprint('ENV NAMES', sorted(os.environ))\nprint('KEY IS', os.environ.get('OPENAI_API_KEY'))\nprint(6 * 7)"
KEYED_SCRIPT = [  # one shot through the OpenAI client, whose executed code looks for the key
    {"content": f"Here is the code.\n\n```python\n{ENV_DUMP}\n```", "tool_calls": [{"name": "transfer_to_executor"}]},
    {"tool_calls": [{"name": "execute_code", "arguments": {"code": ENV_DUMP}}]},
    {"content": "It printed 42.", "tool_calls": [{"name": "transfer_to_summarizer"}]},
    {"content": "## Summary\nThe answer is 42.", "tool_calls": [{"name": "transfer_to_terminator"}]},
    {"content": "TERMINATE"},
]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record) + " " + repr({k: v for k, v in record.__dict__.items() if k not in ("msg", "args")}))


@pytest.fixture
def all_logs():
    """Every logger at DEBUG, captured (also those that do not propagate to the root)."""
    import openai  # noqa: F401 - its loggers (and its HTTP client's) exist before the levels are set

    collect = _Collect()
    saved = []
    loggers = [logging.getLogger()] + [
        logging.getLogger(name) for name, obj in list(logging.root.manager.loggerDict.items()) if isinstance(obj, logging.Logger)
    ]
    disabled = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    for logger in loggers:
        saved.append((logger, logger.level, logger.disabled))
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
        if logger is logging.getLogger() or not logger.propagate:
            logger.addHandler(collect)
    yield collect.records
    for logger, level, was_disabled in saved:
        logger.setLevel(level)
        logger.disabled = was_disabled
        logger.removeHandler(collect)
    logging.disable(disabled)


class _KeyRecordingOpenAI:
    """tests.engine.fake_openai.FakeOpenAI that also records the Authorization header of each request."""

    def __new__(cls, replies):
        from tests.engine.fake_openai import FakeOpenAI

        class Recording(FakeOpenAI):
            def __init__(self, replies) -> None:
                self.authorizations: list[str] = []
                super().__init__(replies)

            def _handler(self):
                base, fake = super()._handler(), self

                class Handler(base):
                    def do_POST(self) -> None:
                        fake.authorizations.append(self.headers.get("Authorization", ""))
                        super().do_POST()

                return Handler

        return Recording(replies)


async def _socket_history(session, user) -> str:
    cookie = await database_sync_to_async(_cookie_for)(user)
    ws = _communicator(f"/ws/sessions/{session.pk}/", cookie=cookie)
    await ws.connect()
    await ws.send_json_to({"type": "hello", "after": 0})
    received = []
    while not await ws.receive_nothing(timeout=0.3):
        received.append(await ws.receive_from(timeout=5))
    await ws.disconnect()
    return "".join(received)


@pytest.mark.django_db(transaction=True)
def test_no_secret_in_pages_exports_sockets_or_logs(people, alice, approver, settings, monkeypatch, all_logs, capfd):
    from orchestrator import api

    settings.SECRET_KEY = SECRET_KEY
    settings.MAX_LIVE_RUNS_PER_USER = 0
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    root = people["superuser"]

    # A full offline run (plan, steps, code, files), and a run through the OpenAI client with the key,
    # whose agent code prints its environment.
    full = services.session_start(owner=alice, task="Compute a damped oscillation and plot it", mode="planning_and_control")
    assert api.execute(full.pk).status == "completed"
    with _KeyRecordingOpenAI(KEYED_SCRIPT) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("CMBAGENT_MODEL", "fake-model")
        keyed = services.session_start(owner=alice, task="What is six times seven?", mode="one_shot", model_provider="openai")
        assert api.execute(keyed.pk).status == "completed"
    with _KeyRecordingOpenAI([{"status": 500}]) as fake_failing:
        monkeypatch.setenv("OPENAI_BASE_URL", fake_failing.base_url)
        failed = services.session_start(owner=alice, task="Fail, please", mode="one_shot", model_provider="openai")
        assert api.execute(failed.pk).status == "failed"
    assert fake.authorizations and set(fake.authorizations) == {f"Bearer {API_KEY}"}  # the key really was used
    executed = Event.objects.get(session=keyed, kind="tool_result").content
    assert "ENV NAMES" in executed and "KEY IS None" in executed and "OPENAI_API_KEY" not in executed
    waiting = waiting_session(alice)

    pages: list[bytes] = []
    owner, staff = _client(alice), _client(root)
    for session in (full, keyed, failed, waiting):
        pk = session.pk
        urls = [
            session.get_absolute_url(), reverse("sessions:events", args=[pk]) + "?before=1000",
            reverse("sessions:export", args=[pk, "md"]), reverse("sessions:export", args=[pk, "json"]),
        ]
        urls += [
            reverse("sessions:file", args=[pk, e.data["path"]])
            for e in Event.objects.filter(session=session, kind="artifact")
            if e.data.get("path")
        ]
        for url in urls:
            response = owner.get(url)
            assert response.status_code == 200, url
            pages.append(_body(response))
        pages.append(async_to_sync(_socket_history)(session, alice).encode())
        for name in ("session", "sessionstate"):
            pages.append(staff.get(reverse(f"admin:agent_sessions_{name}_change", args=[pk])).content)
    for url in (reverse("sessions:list"), reverse("sessions:new"), "/healthz"):
        pages.append(owner.get(url).content)
    pages.append(_client(approver).get(reverse("approvals:queue")).content)
    request = ApprovalRequest.objects.get(session=waiting)
    for url in (
        reverse("admin:index"), reverse("admin:agent_sessions_event_changelist"), reverse("admin:agent_sessions_session_changelist"),
        reverse("admin:approvals_approvalrequest_changelist"), reverse("admin:approvals_approvalrequest_change", args=[request.pk]),
        *[reverse("admin:agent_sessions_event_change", args=[pk]) for pk in Event.objects.filter(session=keyed).values_list("pk", flat=True)],
    ):
        response = staff.get(url)
        assert response.status_code == 200, url
        pages.append(response.content)

    # Logging in: a wrong password, one without the CSRF token, and alice's real one.
    anonymous = Client(enforce_csrf_checks=True)
    token = _form_token(anonymous.get(reverse("login")).content)
    for password, with_token in ((WRONG_PASSWORD, True), (WRONG_PASSWORD, False), ("alice-pass-123", True)):
        data = {"username": "alice", "password": password, **({"csrfmiddlewaretoken": token} if with_token else {})}
        response = anonymous.post(reverse("login"), data)
        pages.append(response.content)
        token = anonymous.cookies["csrftoken"].value
    assert "_auth_user_id" in anonymous.session

    # With DEBUG on (the default of the embedded setup), Django's technical error pages.
    settings.DEBUG = True
    debug_client = Client(raise_request_exception=False)
    debug_client.force_login(alice)
    response = debug_client.get(f"/sessions/{uuid.uuid4()}/")
    assert response.status_code == 404
    pages.append(response.content)
    response = debug_client.post(reverse("sessions:new"), {"task": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1), "mode": "one_shot"})
    assert response.status_code == 400 and b"RequestDataTooBig" in response.content  # the technical page, settings and all
    pages.append(response.content)
    settings.DEBUG = False

    out, err = capfd.readouterr()
    haystacks = {"pages": b"\n".join(pages).decode("utf-8", "replace"), "logs": "\n".join(all_logs), "output": out + err}
    assert len(all_logs) > 20  # the capture works: runs, logins and requests were logged
    for where, text in haystacks.items():
        for secret in (SECRET_KEY, API_KEY, WRONG_PASSWORD, "alice-pass-123"):
            assert secret not in text, f"{secret!r} in {where}"


@pytest.mark.django_db
def test_error_pages_with_the_default_debug_do_not_show_the_redis_password(settings):
    from cmbagent_site.channel_layers import redis_layer

    url = "redis://:redis-pass-CANARY-77@10.0.0.5:6379/0"
    settings.DEBUG = True  # cmbagent_site.settings: DEBUG = _flag("DEBUG", True)
    settings.REDIS_URL, settings.CHANNEL_LAYERS = url, {"default": redis_layer(url)}
    response = Client(raise_request_exception=False).post(reverse("login"), {"username": "x", "password": "y" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)})
    assert response.status_code == 400
    assert b"redis-pass-CANARY-77" not in response.content


# Agent code runs as "nobody" (when the server runs as root): shared by every session of every user.


async def test_agent_code_cannot_reach_another_sessions_files(settings):
    from orchestrator.engine.execution import CodeRunner

    runs = Path(settings.RUNS_DIR)
    bob_folder, alice_folder = runs / str(uuid.uuid4()), runs / str(uuid.uuid4())
    await CodeRunner(bob_folder).execute("open('result.csv', 'w').write('bob-private-CANARY')")
    probe = (
        "import os\n"
        "for name in os.listdir('..'):\n"
        "    try:\n"
        "        print(open(os.path.join('..', name, 'result.csv')).read())\n"
        "        open(os.path.join('..', name, 'planted.png'), 'w').write('x')\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)\n"
    )
    result = await CodeRunner(alice_folder).execute(probe)
    assert "bob-private-CANARY" not in result.stdout
    assert not (bob_folder / "planted.png").exists()


def test_agent_code_cannot_read_the_database_or_the_secret_key(tmp_path):
    var = tmp_path / "fresh-var"  # as `make run` makes it on a new machine
    script = (
        "import asyncio, django\n"
        "django.setup()\n"
        "from pathlib import Path\n"
        "from django.conf import settings\n"
        "from django.db import connection\n"
        "from orchestrator.engine.execution import CodeRunner\n"
        "connection.ensure_connection()\n"
        "code = '''\n"
        "for path in ('../../db.sqlite3', '../../secret_key'):\n"
        "    try:\n"
        "        print(path, 'READ', len(open(path, 'rb').read()))\n"
        "    except OSError as exc:\n"
        "        print(path, type(exc).__name__)\n"
        "'''\n"
        "result = asyncio.run(CodeRunner(Path(settings.RUNS_DIR) / 'some-session').execute(code))\n"
        "print(result.stdout, result.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "RUNS_DIR", "SECRET_KEY")}
    env.update(CMBAGENT_VAR_DIR=str(var), DJANGO_SETTINGS_MODULE="cmbagent_site.settings")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert "db.sqlite3" in out.stdout, out.stderr
    assert "READ" not in out.stdout, out.stdout


# --- oversized input -------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("route", ["sessions:new", "approvals:decide", "login"])
def test_a_body_over_the_upload_limit_is_refused_and_writes_nothing(world, settings, route):
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert limit == 2_621_440  # Django's default: the project does not set it
    client = _client(None if route == "login" else world.people["owner"], raise_request_exception=False)
    url = reverse(route, args=[world.request.pk]) if route == "approvals:decide" else reverse(route)
    field_name = {"sessions:new": "task", "approvals:decide": "feedback", "login": "password"}[route]
    before = snapshot()
    response = client.post(url, {"decision": "approve", "mode": "one_shot", "username": "alice", field_name: "x" * (limit + 1)})
    assert response.status_code == 400
    # The page says what was wrong.
    assert b"The request is too large" in response.content
    assert snapshot() == before


@pytest.mark.django_db
def test_too_many_fields_are_refused(world, settings):
    client = _client(world.people["owner"], raise_request_exception=False)
    data = {f"f{n}": "x" for n in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1)}
    before = snapshot()
    response = client.post(reverse("sessions:new"), {**data, "task": "t", "mode": "one_shot"})
    assert response.status_code == 400 and snapshot() == before


@pytest.mark.django_db
def test_a_body_over_the_upload_limit_is_explained(world, settings):
    client = _client(world.people["owner"], raise_request_exception=False)
    response = client.post(reverse("sessions:new"), {"task": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1), "mode": "one_shot"})
    assert response.status_code in (400, 413) and b"too large" in response.content.lower()


@pytest.mark.django_db
def test_fields_over_their_own_limits_are_explained(world):
    """Under Django's limit but over a field's: the reason is on the page, nothing written."""
    client = _client(world.people["owner"])
    before = snapshot()
    response = client.post(reverse("sessions:new"), {"task": "x" * 100_000, "mode": "one_shot"})
    assert response.status_code == 400 and "100,000 characters long; the limit is 20,000" in response.content.decode()
    response = client.post(reverse("approvals:decide", args=[world.request.pk]), {"decision": "reject", "feedback": "x" * 5000}, HTTP_HX_REQUEST="true")
    assert response.status_code == 400
    assert "The answer was not understood (feedback: Ensure this value has at most 4000 characters (it has 5000).)" in response.content.decode()
    assert snapshot() == before


@pytest.mark.django_db(transaction=True)
async def test_socket_frames_over_max_frame_are_refused_with_a_message(alice, approver):
    session = await database_sync_to_async(waiting_session)(alice)
    cookie = await database_sync_to_async(_cookie_for)(alice)
    ws = _communicator(f"/ws/sessions/{session.pk}/", cookie=cookie)
    assert (await ws.connect())[0]
    refused = "The page sent a message the server could not read: frames must be short JSON text."
    padded = json.dumps({"type": "ping", "pad": "x" * MAX_FRAME})  # valid JSON, one frame too long
    for frame in ("x" * (MAX_FRAME + 1), padded):
        await ws.send_to(text_data=frame)
        reply = await ws.receive_from(timeout=5)
        assert 'id="socket-errors"' in reply and refused in reply
    await ws.send_to(bytes_data=b"x" * 10)  # binary frames are refused the same way
    assert refused in await ws.receive_from(timeout=5)
    # A decide frame with oversized feedback decides nothing.
    big = json.dumps({"type": "decide", "request": "0", "decision": "approve", "feedback": "x" * MAX_FRAME})
    await ws.send_to(text_data=big)
    assert refused in await ws.receive_from(timeout=5)
    # Exactly at the limit is still read, and the socket stays up.
    at_limit = json.dumps({"type": "ping", "pad": ""})
    at_limit = at_limit[:-2] + "x" * (MAX_FRAME - len(at_limit)) + at_limit[-2:]
    assert len(at_limit) == MAX_FRAME
    await ws.send_to(text_data=at_limit)
    assert json.loads(await ws.receive_from(timeout=5)) == {"type": "pong"}
    await ws.disconnect()
    assert await database_sync_to_async(lambda: ApprovalRequest.objects.get(session=session).status)() == "pending"

    # The list and queue sockets read nothing they are sent: a big frame is dropped and they stay open.
    for path, user in (("/ws/sessions/", alice), ("/ws/approvals/", approver)):
        ws = _communicator(path, cookie=await database_sync_to_async(_cookie_for)(user))
        assert (await ws.connect())[0]
        if path == "/ws/approvals/":
            await ws.receive_from(timeout=5)
        await ws.send_to(text_data="x" * (MAX_FRAME * 4))
        assert await ws.receive_nothing(timeout=0.2)
        await ws.disconnect()
