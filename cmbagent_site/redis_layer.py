"""channels-redis's layer, with two leaks of socket churn stopped (see tests/system/test_socket_hygiene.py).

1. Pushes that arrive for a socket whose consumer has ended. channels-redis
   reads every process-local channel's messages from one Redis key, in
   whichever consumer's receive holds the lock, and files each under its
   channel in ``receive_buffer``, creating a buffer for a channel it does not
   know. A push sent before a closing socket left its group reaches the
   process after its consumer is gone: it was filed for good, in a buffer
   nobody reads again (up to ``capacity`` messages each). A receive cancelled
   while it read from Redis also left its channel's (empty) buffer behind.
   The consumers say when they end (:meth:`channel_ended`, called by
   cmbagent_site.sockets): their buffers go, once no receive of theirs is
   under way, and whatever still arrives for them is dropped.

2. A consumer's receive that ignores its cancellation. On Python 3.11,
   ``asyncio.wait_for`` returns the result of an operation that finishes in
   the same step as a cancellation arrives and drops the cancellation;
   redis-py writes every command through it when ``socket_timeout`` is set
   (cmbagent_site.channel_layers sets it). A receive cancelled as its consumer
   ends then went on blocking in Redis, 5 s at a time, until a message came,
   and the consumer with it, until Daphne killed it 10 s later. The receive
   gives the dropped cancellation back (the message, if one was taken, stays
   in channels-redis's in-flight backup and goes back to the channel).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer


class RedisChannelLayer(_RedisChannelLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Process-local channels whose consumer has ended -> when, oldest first. Kept for
        # ``expiry`` seconds: channels-redis drops messages older than that itself.
        self.ended_channels: OrderedDict[str, float] = OrderedDict()
        self.receiving: dict[str, int] = {}  # channel -> receives under way on it

    def channel_ended(self, channel: str) -> None:
        """The consumer reading ``channel`` has ended: drop its buffer now and what arrives for it later."""
        if not self.receiving.get(channel):
            self.receive_buffer.pop(channel, None)  # else when that receive returns (see receive)
        now = time.monotonic()
        self.ended_channels[channel] = now
        self.ended_channels.move_to_end(channel)
        while self.ended_channels and next(iter(self.ended_channels.values())) < now - self.expiry:
            self.ended_channels.popitem(last=False)

    async def receive(self, channel):
        self.receiving[channel] = self.receiving.get(channel, 0) + 1
        try:
            return await super().receive(channel)
        finally:
            if self.receiving[channel] > 1:
                self.receiving[channel] -= 1
            else:
                del self.receiving[channel]
                if channel in self.ended_channels:
                    self.receive_buffer.pop(channel, None)

    async def receive_single(self, channel):
        message_channel, message = await super().receive_single(channel)
        if "!" in channel and self.ended_channels:
            # receive() files the message under each name returned; an ended channel's is dropped.
            names = message_channel if isinstance(message_channel, list) else [message_channel]
            message_channel = [name for name in names if name not in self.ended_channels]
        return message_channel, message

    async def _brpop_with_clean(self, index, channel, timeout):
        # The one wait inside receive_single's loop (a blocking pop of up to brpop_timeout
        # seconds, then again): where a dropped cancellation must be given back.
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        member = await super()._brpop_with_clean(index, channel, timeout)
        if task is not None and task.cancelling() > cancelling:
            raise asyncio.CancelledError()  # a popped message is still in the in-flight backup: not lost
        return member
