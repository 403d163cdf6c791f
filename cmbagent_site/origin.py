"""Origin check for sockets that refuses with close code 4403.

Channels' AllowedHostsOriginValidator refuses during the handshake, which a
browser sees as 1006 and htmx retries forever. This one uses the same rule
(the Origin's host must be in ALLOWED_HOSTS) but accepts and then closes with
4403, so the page knows to stop.
"""
from __future__ import annotations

import logging
from urllib.parse import urlparse

from channels.security.websocket import AllowedHostsOriginValidator

logger = logging.getLogger("sessions")


class OriginValidator:
    def __init__(self, application) -> None:
        self.application = application
        self._checker = AllowedHostsOriginValidator(application)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not self._allowed(scope):
            logger.info("socket refused: origin not allowed (%s)", self._origin(scope) or "none")
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 4403})
            return
        return await self.application(scope, receive, send)

    @staticmethod
    def _origin(scope) -> str:
        for name, value in scope.get("headers", []):
            if name == b"origin":
                return value.decode("latin1")
        return ""

    def _allowed(self, scope) -> bool:
        origin = self._origin(scope)
        # Channels' validator does the matching against ALLOWED_HOSTS; a missing
        # Origin is refused unless ALLOWED_HOSTS allows "*".
        return self._checker.valid_origin(urlparse(origin) if origin else None)
