"""The session socket through the real ASGI stack: origin check, auth, catch-up, pushes."""
from __future__ import annotations

import json
import re

import pytest
from channels.db import database_sync_to_async
from tests.communicator import WebsocketCommunicator
from django.test import Client

from cmbagent_site.asgi import application
from orchestrator.engine.events import EngineEvent, EventKind
from sessions import services

pytestmark = pytest.mark.django_db(transaction=True)
SEQ = re.compile(r'data-seq="(\d+)"')


def _cookie_for(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def _communicator(path: str, *, cookie: bytes | None = None, origin: bytes = b"http://localhost") -> WebsocketCommunicator:
    headers = [(b"origin", origin)]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, path, headers=headers)


async def _closed_with(communicator: WebsocketCommunicator) -> int:
    connected, _ = await communicator.connect()
    assert connected  # accepted so that the close code reaches the browser
    message = await communicator.receive_output(timeout=5)
    await communicator.disconnect()
    assert message["type"] == "websocket.close"
    return message["code"]


@database_sync_to_async
def _start(user, task="Fit the spectrum"):
    return services.session_start(owner=user, task=task, mode="one_shot")


async def _opened(session, user) -> WebsocketCommunicator:
    """The session's socket as ``user``'s page opens it: logged in, accepted."""
    cookie = await database_sync_to_async(_cookie_for)(user)
    ws = _communicator(f"/ws/sessions/{session.pk}/", cookie=cookie)
    connected, _ = await ws.connect()
    assert connected
    return ws


async def _members(group: str) -> int:
    """How many channels the layer (in memory, or Redis on the PostgreSQL tier) has in ``group``."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if hasattr(layer, "groups"):
        return len(layer.groups.get(group, {}))
    return await layer.connection(layer.consistent_hash(group)).zcard(layer._group_key(group))


@database_sync_to_async
def _append(session, content):
    return services.event_append(
        session_id=session.pk, run_id=None, event=EngineEvent(EventKind.MESSAGE, agent="engineer", content=content)
    ).seq


async def test_owner_gets_history_then_live_pushes(alice):
    """After hello, the owner gets every event after its cursor, then each new event once."""
    session = await _start(alice)
    await _append(session, "first message")
    ws = await _opened(session, alice)
    await ws.send_json_to({"type": "hello", "after": 0})
    history = await ws.receive_from(timeout=5)
    assert SEQ.findall(history) == ["1", "2"] and "first message" in history
    assert 'id="session-status"' in history and 'hx-swap-oob="beforeend"' in history

    await _append(session, "second <b>message</b>")
    pushed = await ws.receive_from(timeout=5)
    assert SEQ.findall(pushed) == ["3"]
    assert "second <b>message</b>" not in pushed  # raw HTML from an agent is never passed through
    assert await ws.receive_nothing(timeout=0.2)
    await ws.disconnect()


async def test_reconnect_catches_up_from_cursor(alice):
    """A socket that says it shows seq 2 gets exactly what came after, nothing before."""
    session = await _start(alice)
    for text in ("a", "b", "c"):
        await _append(session, text)
    ws = await _opened(session, alice)
    await ws.send_json_to({"type": "hello", "after": 2})
    assert SEQ.findall(await ws.receive_from(timeout=5)) == ["3", "4"]
    await ws.disconnect()


async def test_the_urls_after_sends_what_is_missing_at_connect_without_a_hello(alice):
    """The page puts the last seq it shows in the socket's URL: what came after is sent as the socket is
    accepted, then each new event. A hello said after it (the page still says one) sends nothing again."""
    session = await _start(alice)
    for text in ("a", "b", "c"):
        await _append(session, text)
    cookie = await database_sync_to_async(_cookie_for)(alice)
    ws = _communicator(f"/ws/sessions/{session.pk}/?after=2", cookie=cookie)
    assert (await ws.connect())[0]
    assert SEQ.findall(await ws.receive_from(timeout=5)) == ["3", "4"]  # no hello sent
    await ws.send_json_to({"type": "hello", "after": 2})  # said before seqs 3 and 4 reached the page
    assert await ws.receive_nothing(timeout=0.3)
    await _append(session, "d")
    assert SEQ.findall(await ws.receive_from(timeout=5)) == ["5"]
    await ws.send_json_to({"type": "hello", "after": 0})  # a hello never rewinds what this socket sent
    assert await ws.receive_nothing(timeout=0.3)
    await ws.disconnect()


async def test_the_urls_after_catches_up_in_batches(alice):
    """More than one batch missing: all of it arrives at connect, in order, each seq once."""
    from sessions.consumers import BATCH

    session = await _start(alice)
    await database_sync_to_async(
        lambda: services.events_append(
            session_id=session.pk, run_id=None, worker_id=None,
            events=[EngineEvent(EventKind.MESSAGE, agent="engineer", content=f"m{i}") for i in range(BATCH + 5)],
        )
    )()
    cookie = await database_sync_to_async(_cookie_for)(alice)
    ws = _communicator(f"/ws/sessions/{session.pk}/?after=1", cookie=cookie)
    assert (await ws.connect())[0]
    seqs = SEQ.findall(await ws.receive_from(timeout=5)) + SEQ.findall(await ws.receive_from(timeout=5))
    assert seqs == [str(n) for n in range(2, BATCH + 7)]
    assert await ws.receive_nothing(timeout=0.3)
    await ws.disconnect()


@pytest.mark.parametrize("query", ["after=-1", "after=x", "after=", "after=1.5"])
async def test_a_bad_after_in_the_url_is_told_and_the_hello_still_works(alice, query):
    session = await _start(alice)
    cookie = await database_sync_to_async(_cookie_for)(alice)
    ws = _communicator(f"/ws/sessions/{session.pk}/?{query}", cookie=cookie)
    assert (await ws.connect())[0]
    error = await ws.receive_from(timeout=5)
    assert 'id="socket-errors"' in error and "after must be a whole number" in error
    await ws.send_json_to({"type": "hello", "after": 0})
    assert SEQ.findall(await ws.receive_from(timeout=5)) == ["1"]
    await ws.disconnect()


@pytest.mark.parametrize("who", ["anonymous", "bob"])
async def test_a_refused_socket_with_after_in_its_url_is_sent_nothing_and_leaves_the_group(alice, bob, who):
    """The socket subscribes before its one read; refused, it leaves again: a later event reaches nobody there."""
    from sessions.groups import session_group

    session = await _start(alice)
    cookie = await database_sync_to_async(_cookie_for)(bob) if who == "bob" else None
    ws = _communicator(f"/ws/sessions/{session.pk}/?after=0", cookie=cookie)
    assert (await ws.connect())[0]
    assert await ws.receive_output() == {"type": "websocket.close", "code": 4401 if who == "anonymous" else 4403}
    assert await _members(session_group(session.pk)) == 0  # joined for the read, then left
    owner = await _opened(session, alice)
    assert await _members(session_group(session.pk)) == 1  # the count sees a member (the control)
    await owner.disconnect()
    await ws.disconnect()


async def test_anonymous_is_closed_with_4401(alice):
    session = await _start(alice)
    assert await _closed_with(_communicator(f"/ws/sessions/{session.pk}/")) == 4401


async def test_other_user_is_closed_with_4403(alice, bob):
    session = await _start(alice)
    cookie = await database_sync_to_async(_cookie_for)(bob)
    assert await _closed_with(_communicator(f"/ws/sessions/{session.pk}/", cookie=cookie)) == 4403


@pytest.mark.parametrize("who", ["anonymous", "bob"])
async def test_a_refused_socket_ignores_the_hello_the_page_sent_before_it_heard(alice, bob, who):
    """A page sends its hello as soon as the socket opens, which can be before the refusal's close
    frame reaches it. The server must ignore that frame: a consumer that handled it raised (it has no
    session), and Daphne then dropped the connection, so the browser saw 1006 instead of the code."""
    session = await _start(alice)
    cookie = await database_sync_to_async(_cookie_for)(bob) if who == "bob" else None
    ws = _communicator(f"/ws/sessions/{session.pk}/", cookie=cookie)
    assert (await ws.connect())[0]
    await ws.send_json_to({"type": "hello", "after": 0})
    await ws.send_json_to({"type": "decide", "request": "x", "decision": "approve"})
    closed = await ws.receive_output()
    assert closed == {"type": "websocket.close", "code": 4401 if who == "anonymous" else 4403}
    assert await ws.receive_nothing(timeout=0.3)  # no error fragment, nothing sent after the close
    await ws.disconnect()  # re-raises whatever the consumer raised


async def test_wrong_origin_is_closed_with_4403(alice):
    session = await _start(alice)
    cookie = await database_sync_to_async(_cookie_for)(alice)
    ws = _communicator(f"/ws/sessions/{session.pk}/", cookie=cookie, origin=b"http://evil.example")
    assert await _closed_with(ws) == 4403


async def test_missing_origin_is_closed_with_4403(alice):
    session = await _start(alice)
    cookie = await database_sync_to_async(_cookie_for)(alice)
    ws = WebsocketCommunicator(application, f"/ws/sessions/{session.pk}/", headers=[(b"cookie", cookie)])
    assert await _closed_with(ws) == 4403


@pytest.mark.parametrize("raw_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000"])
async def test_bad_or_unknown_session_id(alice, raw_id):
    """A malformed id closes with 4404; a well-formed unknown one looks like someone else's (4403)."""
    cookie = await database_sync_to_async(_cookie_for)(alice)
    code = await _closed_with(_communicator(f"/ws/sessions/{raw_id}/", cookie=cookie))
    assert code == (4404 if raw_id == "not-a-uuid" else 4403)


@pytest.mark.parametrize(
    "frame",
    ["not json", "[1, 2]", '{"type": "hello", "after": -1}', '{"type": "hello", "after": "x"}', '{"type": "launch"}', "x" * 10_000],
)
async def test_malformed_frames_get_an_error_and_the_socket_stays_up(alice, frame):
    """A malformed frame is answered with a visible error fragment; the socket keeps working."""
    session = await _start(alice)
    ws = await _opened(session, alice)
    await ws.send_to(text_data=frame)
    error = await ws.receive_from(timeout=5)
    assert 'id="socket-errors"' in error and "could not read" in error
    await ws.send_json_to({"type": "hello", "after": 0})
    assert SEQ.findall(await ws.receive_from(timeout=5)) == ["1"]
    await ws.disconnect()


async def test_next_event_is_sent_as_rendered_and_a_gap_is_read_from_rows(alice):
    """A note for the very next seq is sent as carried; after a gap the socket reads the rows instead."""
    from channels.layers import get_channel_layer

    from sessions.groups import session_group

    session = await _start(alice)
    ws = await _opened(session, alice)
    await ws.send_json_to({"type": "hello", "after": 0})
    assert SEQ.findall(await ws.receive_from(timeout=5)) == ["1"]

    layer = get_channel_layer()
    await layer.group_send(session_group(session.pk), {"type": "session.event", "seq": 2, "html": "<p>carried seq 2</p>"})
    assert await ws.receive_from(timeout=5) == "<p>carried seq 2</p>"

    # The socket believes it shows seq 2, so the real note for 2 is ignored as
    # already shown, and the real seq 3 follows it.
    for text in ("two", "three"):
        await _append(session, text)
    frames = ""
    while 'data-seq="3"' not in frames:
        frames += await ws.receive_from(timeout=5)
    assert "three" in frames and "carried" not in frames
    await layer.group_send(session_group(session.pk), {"type": "session.event", "seq": 9, "html": "<p>forged</p>"})
    assert await ws.receive_nothing(timeout=0.3)  # seq 9 is a gap with no rows behind it: nothing invented
    await ws.disconnect()


async def test_the_session_list_socket_pushes_each_status_badge_to_its_owner_only(alice, bob):
    mine, theirs = await _start(alice), await _start(bob)
    alice_ws = _communicator("/ws/sessions/", cookie=await database_sync_to_async(_cookie_for)(alice))
    bob_ws = _communicator("/ws/sessions/", cookie=await database_sync_to_async(_cookie_for)(bob))
    assert (await alice_ws.connect())[0] and (await bob_ws.connect())[0]

    @database_sync_to_async
    def suspend(session, user):
        services.session_suspend(session_id=session.pk, user=user)

    await suspend(mine, alice)
    frame = await alice_ws.receive_from(timeout=5)
    assert f'<span id="badge-{mine.pk}" class="badge badge--suspended" data-status="suspended" hx-swap-oob="true">Suspended</span>' in frame
    assert f'<span id="session-events-{mine.pk}" hx-swap-oob="true">2</span>' in frame
    assert await bob_ws.receive_nothing(timeout=0.3)  # another user's session says nothing to bob
    await suspend(theirs, bob)
    assert f"badge-{theirs.pk}" in await bob_ws.receive_from(timeout=5)
    assert await alice_ws.receive_nothing(timeout=0.3)
    await alice_ws.disconnect()
    await bob_ws.disconnect()


async def test_the_session_list_socket_refuses_the_anonymous():
    assert await _closed_with(_communicator("/ws/sessions/")) == 4401


async def test_a_page_that_floods_its_socket_is_told_and_closed(alice, settings):
    settings.SOCKET_MESSAGES_PER_SECOND = 5
    session = await _start(alice)
    ws = _communicator(f"/ws/sessions/{session.pk}/", cookie=await database_sync_to_async(_cookie_for)(alice))
    assert (await ws.connect())[0]
    for _ in range(60):  # the burst is allowed
        await ws.send_json_to({"type": "ping"})
        assert json.loads(await ws.receive_from(timeout=5)) == {"type": "pong"}
    await ws.send_json_to({"type": "ping"})
    assert "too many messages too fast" in await ws.receive_from(timeout=5)
    assert (await ws.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4429}


async def test_a_batch_note_is_sent_as_rendered_only_when_it_starts_right_after_the_cursor(alice):
    """A worker announces a batch of events with one note (``first``..``seq``): sent as carried when it
    starts at the socket's next seq, read from the rows when it does not."""
    from channels.layers import get_channel_layer

    from sessions.groups import session_group

    session = await _start(alice)
    ws = await _opened(session, alice)
    await ws.send_json_to({"type": "hello", "after": 0})
    assert SEQ.findall(await ws.receive_from(timeout=5)) == ["1"]

    layer = get_channel_layer()
    await layer.group_send(session_group(session.pk), {"type": "session.event", "first": 2, "seq": 4, "html": "<p>carried 2-4</p>"})
    assert await ws.receive_from(timeout=5) == "<p>carried 2-4</p>"
    # The cursor is 4 now: a batch overlapping what the socket shows (3..5) is not sent as carried.
    for text in ("two", "three", "four", "five"):
        await _append(session, text)
    frames = ""
    while 'data-seq="5"' not in frames:
        frames += await ws.receive_from(timeout=5)
    await layer.group_send(session_group(session.pk), {"type": "session.event", "first": 3, "seq": 6, "html": "<p>overlap</p>"})
    assert await ws.receive_nothing(timeout=0.3)  # nothing after 5 in the rows, and the overlap is never sent
    assert SEQ.findall(frames) == ["5"] and "five" in frames and "overlap" not in frames
    await ws.disconnect()


def test_a_batch_read_after_its_session_shows_the_status_of_its_newest_rows(alice):
    """A socket reads the session, then the rows after the page's seq. A status change committed between the
    two reads is among the rows; the status and totals sent with them must not show the state before it: the
    socket's cursor passes those rows, so no later note would correct a run that now waits for a person."""
    from sessions import consumers, selectors
    from sessions.models import Session

    session = services.session_start(owner=alice, task="Estimate the optical depth to reionization", mode="one_shot")
    read_first = selectors.session_for_user(session.pk, alice)  # the socket's session read, before the change
    run = services.run_claim(worker_id="w-race", lease_seconds=30)
    services.run_finish(run_id=run.pk, worker_id=run.lease_owner, status="waiting_approval", detail="Waiting for a person.")
    html, cursor, count = consumers._render(read_first, 0)
    now = Session.objects.get(pk=session.pk)
    assert (cursor, count) == (now.last_seq, now.last_seq) and now.status == "waiting_approval"
    assert re.search(r'id="session-status" class="badge badge--waiting_approval" data-status="waiting_approval"', html)
    assert f'data-testid="event-count">{now.last_seq}<' in html


async def test_staff_who_decide_approvals_watch_any_session_live(alice, approver):
    """Staff with the approvals permission see the session they decide for: its socket opens, with its events."""
    session = await _start(alice)
    ws = await _opened(session, approver)
    await ws.send_json_to({"type": "hello", "after": 0})
    assert 'data-seq="1"' in await ws.receive_from(timeout=5)
    await ws.disconnect()


async def test_staff_without_the_approvals_permission_are_refused(alice, django_user_model):
    session = await _start(alice)
    staff = await database_sync_to_async(django_user_model.objects.create_user)("dave", password="x-Pa55word!", is_staff=True)
    cookie = await database_sync_to_async(_cookie_for)(staff)
    assert await _closed_with(_communicator(f"/ws/sessions/{session.pk}/", cookie=cookie)) == 4403
