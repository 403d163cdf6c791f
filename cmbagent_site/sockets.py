"""The base of the app's WebSocket consumers: whatever way a socket ends, it leaves nothing behind.

Found by tests/system/test_socket_hygiene.py (10,000 sockets, half closed
abruptly, pushes in flight):

- A send to a socket that is closing or closed raised (Daphne hands it to
  autobahn, which raises ``Disconnected`` once a close frame has gone either
  way, before the application hears of the disconnect). The push or reply
  that met it crashed the consumer ("Exception inside application") before
  it left its groups. Such a send is now dropped: nobody is there to read it.
- A consumer that ended any other way than by a disconnect (a handler that
  raised, or Daphne cancelling one slow to shut down under overload) kept its
  group memberships: every later push to the group was still sent to its dead
  channel, until channels-redis's one-day group expiry. Groups joined through
  :meth:`join` are left when the socket disconnects and, whatever happened,
  when the consumer ends; the channel layer is then told the channel has
  ended (see cmbagent_site.redis_layer).
- Frames that arrive after the consumer closed the socket (a flood told to
  stop with 4429 had thousands more on their way), and pushes for a socket
  that is closed either way, were still handled, one by one, each with a trip
  to the database thread, for nobody. They are now dropped unread; the
  disconnect that follows still ends the consumer. (The frames of a client
  that left by itself are still handled: one may carry a decision.)
"""
from __future__ import annotations

import asyncio
import logging

from channels.generic.websocket import AsyncWebsocketConsumer

try:  # what Daphne's protocol (autobahn) raises on a send once the socket is closing or closed
    from autobahn.exception import Disconnected as _Disconnected
except ImportError:  # pragma: no cover - Daphne always brings autobahn
    _Disconnected = OSError

logger = logging.getLogger("sessions")

# The ASGI spec lets a server raise an OSError for a send after the client went away.
SOCKET_GONE = (_Disconnected, OSError)


class SocketConsumer(AsyncWebsocketConsumer):
    """An AsyncWebsocketConsumer whose sends never raise on a gone socket and whose groups are always left."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.joined_groups: list[str] = []
        self.socket_closed = False  # a close was sent or the client went away: later sends are dropped
        self.close_sent = False  # this consumer closed the socket: the client was told to stop sending

    async def join(self, group: str) -> None:
        """Join ``group`` for as long as this socket lives."""
        # Noted first: a consumer cancelled during the add still leaves it.
        self.joined_groups.append(group)
        await self.channel_layer.group_add(group, self.channel_name)

    async def leave_groups(self) -> None:
        for group in dict.fromkeys(self.joined_groups):
            await self.channel_layer.group_discard(group, self.channel_name)
            # Struck off once left: a leave cut short by a cancellation is done again at the end.
            self.joined_groups = [g for g in self.joined_groups if g != group]

    async def __call__(self, scope, receive, send):
        async def send_unless_gone(message: dict) -> None:
            if self.socket_closed:
                return
            if message.get("type") == "websocket.close":
                self.socket_closed = self.close_sent = True
            try:
                await send(message)
            except SOCKET_GONE as exc:
                self.socket_closed = True
                logger.debug("dropped a %s to a closed socket (%r)", message.get("type"), exc)

        try:
            await super().__call__(scope, receive, send_unless_gone)
        finally:
            # Also when a handler raised or the consumer was cancelled. Shielded: Daphne cancels
            # a consumer slow to end again every second, which must not cut the leaving short.
            await asyncio.shield(self._end())

    async def _end(self) -> None:
        layer, channel = getattr(self, "channel_layer", None), getattr(self, "channel_name", None)
        if layer is None or channel is None:
            return
        try:
            await self.leave_groups()
        except Exception:  # noqa: BLE001 - the layer is down: its groups expire by themselves
            logger.warning("socket %s could not leave its groups", channel, exc_info=True)
        ended = getattr(layer, "channel_ended", None)
        if ended is not None:
            ended(channel)

    async def dispatch(self, message: dict) -> None:
        kind = message.get("type", "")
        if kind != "websocket.disconnect" and (
            # A frame the client sent before our close reached it (a flood told to stop, say). A frame
            # from a client that went away by itself is still handled: it may carry a decision.
            (kind == "websocket.receive" and self.close_sent)
            # A push for the page, which nobody reads any more.
            or (not kind.startswith("websocket.") and self.socket_closed)
        ):
            # Dropped before channels' dispatch, which would first send the database thread a trip
            # (closing stale connections) for every one.
            return
        await super().dispatch(message)

    async def websocket_disconnect(self, message: dict) -> None:
        self.socket_closed = True
        await self.leave_groups()  # at once: pushes to the groups stop coming here
        await super().websocket_disconnect(message)
