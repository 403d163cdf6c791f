"""cmbagent_site.sockets.SocketConsumer: a send to a gone socket is dropped, and groups are left however a consumer ends.

The system tier's test_socket_hygiene shows the same against a real server
under churn; these pin each behaviour down in the default tier.
"""
from __future__ import annotations

import asyncio

import pytest
from autobahn.exception import Disconnected
from channels.layers import get_channel_layer

from cmbagent_site.sockets import SocketConsumer

GROUP = "hygiene.test"


@pytest.fixture(autouse=True)
def in_memory_layer(settings):
    """These tests read the layer's group table: the in-memory layer's, on every tier (tier 2 sets REDIS_URL)."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


class Probe(SocketConsumer):
    handled: list[str] = []  # every frame a probe's handler saw, in order

    async def connect(self) -> None:
        await self.join(GROUP)
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None) -> None:
        Probe.handled.append(text_data)
        if text_data == "raise":
            raise RuntimeError("a handler that fails")
        if text_data == "hang":
            await asyncio.sleep(3600)
        if text_data == "close":
            await self.close(code=4429)
            return
        await self.send(text_data="echo:" + text_data)

    async def probe_note(self, event: dict) -> None:  # a push to the group
        Probe.handled.append(f"note {event['n']}")
        await self.send(text_data=f"note:{event['n']}")


class Socket:
    """The server's side of one socket: what the consumer reads, and a send that can fail like Daphne's."""

    def __init__(self, fail_sends: bool = False) -> None:
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.fail_sends = fail_sends
        self.task: asyncio.Task | None = None

    async def send(self, message: dict) -> None:
        if self.fail_sends and message["type"] == "websocket.send":
            raise Disconnected("Attempt to send on a closed protocol")
        self.sent.append(message)

    def start(self) -> None:
        scope = {"type": "websocket", "path": "/ws/probe/", "headers": [], "subprotocols": []}
        self.task = asyncio.create_task(Probe.as_asgi()(scope, self.incoming.get, self.send))
        self.incoming.put_nowait({"type": "websocket.connect"})

    async def say(self, text: str) -> None:
        await self.incoming.put({"type": "websocket.receive", "text": text})
        await asyncio.sleep(0.05)


def _members() -> dict:
    return dict(get_channel_layer().groups.get(GROUP, {}))


async def _joined(socket: Socket) -> None:
    for _ in range(100):
        if _members():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the probe never joined its group")


async def test_pushes_reach_an_open_socket():
    """The probe's push handler works: what the next tests see dropped is dropped for being late."""
    Probe.handled.clear()
    socket = Socket()
    socket.start()
    await _joined(socket)
    await get_channel_layer().group_send(GROUP, {"type": "probe.note", "n": 7})
    await socket.say("after")
    assert Probe.handled == ["note 7", "after"]
    await socket.incoming.put({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(socket.task, 5)


async def test_a_send_to_a_gone_socket_is_dropped_and_the_consumer_goes_on():
    Probe.handled.clear()
    socket = Socket(fail_sends=True)
    socket.start()
    await _joined(socket)
    await socket.say("hello")  # its reply meets a closed socket: dropped, not raised
    await socket.say("again")  # the client went away by itself: its frames are still handled (a decision, say)
    await get_channel_layer().group_send(GROUP, {"type": "probe.note", "n": 2})  # a push for nobody: dropped
    await socket.say("last")
    assert Probe.handled == ["hello", "again", "last"]
    assert not socket.task.done()
    await socket.incoming.put({"type": "websocket.disconnect", "code": 1006})
    await asyncio.wait_for(socket.task, 5)
    assert _members() == {}


async def test_a_consumer_whose_handler_raised_leaves_its_groups():
    socket = Socket()
    socket.start()
    await _joined(socket)
    await socket.say("raise")
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(socket.task, 5)
    assert _members() == {}


async def test_a_cancelled_consumer_leaves_its_groups():
    socket = Socket()
    socket.start()
    await _joined(socket)
    await socket.say("hang")
    socket.task.cancel()  # as Daphne does to a consumer slow to end after its socket closed
    with pytest.raises(asyncio.CancelledError):
        await socket.task
    for _ in range(100):
        if not _members():
            break
        await asyncio.sleep(0.01)
    assert _members() == {}


async def test_frames_after_the_consumer_closed_are_not_handled():
    Probe.handled.clear()
    socket = Socket()
    socket.start()
    await _joined(socket)
    await socket.say("first")
    await socket.say("close")  # the consumer closes (as on a flood) ...
    for n in range(50):  # ... while the frames the client sent before it knew are still arriving
        await socket.incoming.put({"type": "websocket.receive", "text": f"late {n}"})
    await get_channel_layer().group_send(GROUP, {"type": "probe.note", "n": 1})  # and a push for the page
    await socket.say("last")
    assert Probe.handled == ["first", "close"]  # not one of them handled
    assert [m["type"] for m in socket.sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    await socket.incoming.put({"type": "websocket.disconnect", "code": 4429})
    await asyncio.wait_for(socket.task, 5)
    assert _members() == {}
