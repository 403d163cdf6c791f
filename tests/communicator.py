"""channels' WebsocketCommunicator with waits sized for CI, where the three test lanes share two cores.

channels waits 1 s by default for a consumer's answer (its accept on connect, its next frame); each answer
here goes through the database thread, which a busy machine can hold for longer. A longer wait changes
no verdict: a consumer that answers passes as soon as it does, and one that never answers still fails.
Waits that prove *nothing* arrives (``receive_nothing``) keep channels' own defaults.
"""
from __future__ import annotations

from channels.testing import WebsocketCommunicator as _ChannelsCommunicator

ANSWER_TIMEOUT = 10.0


class WebsocketCommunicator(_ChannelsCommunicator):
    async def connect(self, timeout: float = ANSWER_TIMEOUT):
        return await super().connect(timeout)

    async def receive_from(self, timeout: float = ANSWER_TIMEOUT):
        return await super().receive_from(timeout)

    async def receive_json_from(self, timeout: float = ANSWER_TIMEOUT):
        return await super().receive_json_from(timeout)
