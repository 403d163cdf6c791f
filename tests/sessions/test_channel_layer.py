"""The Redis channel layer keeps idle consumers alive (PostgreSQL + Redis tier)."""
from __future__ import annotations

import asyncio
import os

import pytest
from channels.layers import get_channel_layer

pytestmark = pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="runs in the PostgreSQL + Redis tier")


async def test_an_idle_receive_outlives_the_redis_read_timeout():
    """A receive that waits longer than channels-redis's 5 s blocking read still gets its message."""
    layer = get_channel_layer()
    channel = await layer.new_channel()

    async def send_late():
        await asyncio.sleep(6.5)
        await layer.send(channel, {"type": "late.note"})

    sender = asyncio.create_task(send_late())
    message = await asyncio.wait_for(layer.receive(channel), timeout=15)
    await sender
    assert message == {"type": "late.note"}
