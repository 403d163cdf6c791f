"""cmbagent_site.redis_layer against a real Redis: what arrives for an ended consumer's channel is not kept."""
from __future__ import annotations

import asyncio

import pytest


@pytest.fixture
def layer(redis_configured_layer):
    return redis_configured_layer


async def test_pushes_for_an_ended_channel_are_dropped_not_buffered(layer):
    gone, alive = await layer.new_channel(), await layer.new_channel()
    for channel in (gone, alive):
        await layer.group_add("watchers", channel)
    layer.channel_ended(gone)  # its consumer ended before leaving the group (or the push was already on its way)
    for n in range(3):
        await layer.group_send("watchers", {"type": "note", "n": n})
    received = [await asyncio.wait_for(layer.receive(alive), 10) for _ in range(3)]
    assert [m["n"] for m in received] == [0, 1, 2]
    assert gone not in layer.receive_buffer  # without the fix: a buffer of 3 messages nobody reads
    await layer.group_discard("watchers", gone)
    await layer.group_discard("watchers", alive)


async def test_a_receive_under_way_keeps_its_buffer_until_it_returns(layer):
    channel = await layer.new_channel()
    waiting = asyncio.create_task(layer.receive(channel))
    await asyncio.sleep(0.2)
    layer.channel_ended(channel)  # told while its receive still waits (a consumer slow to stop it)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert channel not in layer.receive_buffer and channel not in layer.receiving
