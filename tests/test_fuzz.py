"""Bad input, generated: socket frames, form posts and query strings against every route.

No response may be a 500 and no consumer may crash: every socket still answers
a ping after whatever it was sent.
"""
from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from approvals.models import ApprovalRequest
from sessions import services
from tests.approvals.helpers import waiting_session
from tests.sessions.test_consumers import _communicator, _cookie_for

pytestmark = pytest.mark.django_db(transaction=True)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False), text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12)
frame_types = st.sampled_from(["hello", "decide", "ping", "resolve_approval", "approval_response", "", "other"])
frames = st.one_of(
    text,
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"type": frame_types},
        optional={
            "after": json_values,
            "request": json_values,
            "approval_id": json_values,
            "decision": json_values,
            "resolution": json_values,
            "approved": json_values,
            "feedback": json_values,
            "edits": json_values,
            "modifications": json_values,
            "copilotSessionId": json_values,
        },
    ).map(json.dumps),
)
form_data = st.dictionaries(
    st.sampled_from(["task", "mode", "title", "max_rounds", "auto_continue", "approve_code", "chat", "decision", "feedback",
                     "steps", "code", "door", "csrfmiddlewaretoken", "username", "password", "page", "q", "status"]) | text,
    st.one_of(text, st.lists(text, max_size=3)),
    max_size=8,
)
queries = st.dictionaries(
    st.sampled_from(["page", "q", "status", "mode", "kind", "age", "session", "before", "next"]) | text, text, max_size=5
)


@pytest.fixture
def world(alice, approver):
    """A session waiting on a plan, its request, and clients for its owner and a staff approver."""
    session = waiting_session(alice)
    request = ApprovalRequest.objects.get(session=session)
    owner, staff = Client(raise_request_exception=False), Client(raise_request_exception=False)
    owner.force_login(alice)
    staff.force_login(approver)
    return {"session": session, "request": request, "owner": owner, "staff": staff}


def _get_routes(world) -> list[str]:
    pk = world["session"].pk
    return [
        reverse("sessions:list"), reverse("sessions:new"), reverse("sessions:detail", args=[pk]),
        reverse("sessions:events", args=[pk]), reverse("sessions:export", args=[pk, "md"]),
        reverse("sessions:export", args=[pk, "json"]), reverse("approvals:queue"), reverse("login"),
        "/admin/approvals/approvalrequest/", "/admin/approvals/legacyapproval/", "/healthz",
    ]


def _post_routes(world) -> list[str]:
    pk = world["session"].pk
    return [
        reverse("sessions:new"), reverse("sessions:action", args=[pk, "continue"]), reverse("sessions:action", args=[pk, "cancel"]),
        reverse("sessions:action", args=[pk, "resume"]), reverse("approvals:decide", args=[world["request"].pk]),
        reverse("login"), "/admin/approvals/approvalrequest/",
    ]


@FUZZ
@given(query=queries)
def test_query_strings_never_give_a_500(world, query):
    for client in (world["owner"], world["staff"]):
        for route in _get_routes(world):
            response = client.get(route, query)
            assert response.status_code < 500, (route, query, response.status_code)


@FUZZ
@given(data=form_data)
def test_form_posts_never_give_a_500(world, data, settings):
    settings.MAX_LIVE_RUNS_PER_USER = 0
    for client in (world["owner"], world["staff"]):
        for route in _post_routes(world):
            response = client.post(route, data)
            assert response.status_code < 500, (route, data, response.status_code)


@pytest.fixture
def socket_target(alice):
    session = services.session_start(owner=alice, task="fuzzed", mode="one_shot")
    return f"/ws/sessions/{session.pk}/", _cookie_for(alice)


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=5))
async def test_socket_frames_never_crash_the_consumer(socket_target, sent):
    path, cookie = socket_target
    ws = _communicator(path, cookie=cookie)
    assert (await ws.connect())[0]
    for frame in sent:
        await ws.send_input({"type": "websocket.receive", "text": frame})  # empty text too, which send_to refuses
    await ws.send_json_to({"type": "ping"})
    # Whatever came before (error fragments, catch-up), the consumer is alive and answers in order.
    for _ in range(len(sent) + 3):
        reply = await ws.receive_from(timeout=10)
        if reply == '{"type": "pong"}':
            break
    else:
        pytest.fail(f"no pong after {sent!r}")
    await ws.disconnect()


@FUZZ
# "#" and "?" end a URL's path: what follows them is not a session id.
@given(path=st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"], exclude_characters="#?"), max_size=80))
async def test_odd_socket_paths_are_refused_cleanly(socket_target, path):
    ws = _communicator(f"/ws/sessions/{path}/", cookie=socket_target[1])
    try:
        connected, _ = await ws.connect()
    except ValueError:
        return  # no route: the router refuses before any consumer exists
    if connected:
        message = await ws.receive_output(timeout=5)
        assert message["type"] == "websocket.close" and message["code"] in (4403, 4404), message
    await ws.disconnect()


@pytest.mark.parametrize("route", ["/sessions/?status=%00", "/admin/approvals/approvalrequest/?status=%00", "/approvals/?kind=a%00b", "/sessions/%00/"])
def test_a_nul_in_the_address_is_a_clear_400_on_every_database(world, route):
    response = world["staff"].get(route)
    assert response.status_code == 400 and b"NUL character" in response.content
