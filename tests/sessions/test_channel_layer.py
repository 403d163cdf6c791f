"""The Redis channel layer, as configured, keeps idle consumers alive (runs against a real Redis)."""
from __future__ import annotations

import asyncio


async def test_an_idle_receive_outlives_the_redis_read_timeout(redis_configured_layer):
    """A receive that waits longer than channels-redis's 5 s blocking read still gets its message."""
    layer = redis_configured_layer
    channel = await layer.new_channel()

    async def send_late():
        await asyncio.sleep(6.5)
        await layer.send(channel, {"type": "late.note"})

    sender = asyncio.create_task(send_late())
    message = await asyncio.wait_for(layer.receive(channel), timeout=15)
    await sender
    assert message == {"type": "late.note"}


async def test_hundreds_of_sockets_joining_and_receiving_at_once_do_not_exhaust_the_pool(redis_configured_layer):
    """300 consumers' worth of group joins, blocking receives and sends at the same moment: none fails."""
    layer = redis_configured_layer
    channels = [await layer.new_channel() for _ in range(300)]
    await asyncio.gather(*(layer.group_add("crowd", channel) for channel in channels))
    receives = [asyncio.create_task(layer.receive(channel)) for channel in channels]  # each holds a connection while it waits
    await asyncio.sleep(0.5)
    await layer.group_send("crowd", {"type": "crowd.note"})
    received = await asyncio.wait_for(asyncio.gather(*receives), timeout=20)
    assert received == [{"type": "crowd.note"}] * 300
    await asyncio.gather(*(layer.group_discard("crowd", channel) for channel in channels))
