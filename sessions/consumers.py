"""The session socket: pushes transcript fragments rendered from Event rows.

The socket never owns a run. It subscribes to the session's group, learns
which seq the page already shows, then sends every event after that seq and,
on each "seq N is ready" note, whatever is new since. Notes are only hints:
rows are always read from the database, so nothing falls between a page load
and a push, and nothing is sent twice on one socket.

The page says which seq it shows in its socket's URL (``?after=N``, set
afresh on every connect and reconnect). The socket then needs one trip to
the database before its first frame: the user, the session and the events
after N are read together, and sent as soon as the socket is accepted. A
client that leaves ``after`` out says it in its first frame instead
(``{"type": "hello", "after": N}``); a hello after an ``after`` in the URL
changes nothing that was already sent.
"""
from __future__ import annotations

import json
import logging
import time
import uuid

from channels.auth import get_user
from django.conf import settings
from django.http import QueryDict
from django.template.loader import render_to_string

from cmbagent_site.db import database_sync_to_async
from cmbagent_site.sockets import SocketConsumer
from sessions.fragments import render_push
from sessions.groups import owner_group, session_group
from sessions.models import Session
from sessions.selectors import events_after, session_for_viewer

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_MANY = 4429
BURST = 60  # messages a page may send at once before the per-second rate applies
BATCH = 200
MAX_FRAME = 64 * 1024  # control frames, and decisions with their feedback and edits
# Frames of the older CMBAgent client, accepted and routed through the one approval service.
LEGACY_DECISIONS = ("resolve_approval", "approval_response")


def _render(session: Session, after: int) -> tuple[str, int, int]:
    """Fragments for up to BATCH events after ``after``: (html, new cursor, count)."""
    rows = events_after(session.pk, after, limit=BATCH)
    if not rows:
        return "", after, 0
    if rows[-1].seq > session.last_seq:
        # Rows committed after the session was read (a status change among them): the status and totals
        # sent with them are read again, or they would show the state before those rows, and nothing
        # later corrects them (the cursor passes those rows; a run waiting for a person writes no more).
        # Read after the rows, they may show a little more than the rows, which the next batch brings.
        session = Session.objects.select_related("state").get(pk=session.pk)
    return render_push(session, rows), rows[-1].seq, len(rows)


@database_sync_to_async
def _render_after(session_id: uuid.UUID, after: int) -> tuple[str, int, int]:
    return _render(Session.objects.select_related("state").get(pk=session_id), after)


@database_sync_to_async
def _open(scope: dict, session_id: uuid.UUID | None, after: int | None) -> tuple[int, tuple[str, int, int] | None]:
    """A connect's one trip to the database: who the user is, whether they may see the session, and,
    if the URL said what the page shows, the events after it. Returns (refusal code or 0, first batch)."""
    user = scope.get("user")
    if user is None and "session" in scope:
        # This route resolves its user here rather than in a middleware of its own trip (see routing).
        user = scope["user"] = get_user.func(scope)
    if user is None or not user.is_authenticated:
        return CLOSE_UNAUTHENTICATED, None
    if session_id is None:
        return CLOSE_NOT_FOUND, None
    session = session_for_viewer(session_id, user)
    if session is None:
        return CLOSE_FORBIDDEN, None
    return 0, None if after is None else _render(session, after)


def _after(value) -> int | None:
    """A page's "I show up to seq N" (hello's ``after``, or the URL's): N, or None if it is no whole number."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    return value


def _decide_from_socket(user, session_id: uuid.UUID, frame: dict) -> str:
    """Decide through the approval service; returns why not, or "" on success."""
    from approvals import services as approvals
    from approvals.models import ApprovalRequest, Door
    from approvals.legacy import DECISIONS

    try:
        request = ApprovalRequest.objects.filter(pk=uuid.UUID(str(frame.get("request"))), session_id=session_id).first()
    except ValueError:
        request = None
    if request is None:
        return "no such approval request in this session"
    decision = frame.get("decision")
    if frame.get("legacy_resolution"):
        decision = DECISIONS.get(request.kind, {}).get(frame["legacy_resolution"], frame["legacy_resolution"])
        if decision == "edit" and request.kind == "plan" and isinstance(frame["edits"], dict) and "steps" not in frame["edits"]:
            frame["edits"] = {"steps": frame["edits"].get("plan") or []}
    edits = frame.get("edits") if isinstance(frame.get("edits"), dict) else {}
    door = Door.LEGACY_API if frame.get("door") == "legacy_api" else Door.SESSION_PAGE
    try:
        approvals.decide(request.pk, user=user, decision=str(decision or ""), feedback=str(frame.get("feedback") or ""), edits=edits, door=door)
    except PermissionError:
        return "you may not decide this request"
    except approvals.ApprovalError as exc:
        return str(exc)
    return ""


class SessionConsumer(SocketConsumer):
    group: str | None = None
    cursor: int | None = None

    async def connect(self) -> None:
        raw_id = self.scope["url_route"]["kwargs"].get("session_id", "")
        try:
            session_id: uuid.UUID | None = uuid.UUID(raw_id)
        except ValueError:
            session_id = None
        query = QueryDict(self.scope.get("query_string", b"").decode("latin-1"))
        after = _after(query.get("after")) if "after" in query else None
        bad_after = "after" in query and after is None
        if session_id is not None:
            # Subscribe first, then read: nothing committed in between is missed. (Left again on a refusal.)
            await self.join(session_group(session_id))
        refusal, first = await _open(self.scope, session_id, after)
        if refusal:
            user = self.scope.get("user")
            logger.info(
                "session socket refused (%s): user %s, session %r",
                {CLOSE_UNAUTHENTICATED: "not logged in", CLOSE_NOT_FOUND: "not a session id"}.get(refusal, "not theirs"),
                getattr(user, "pk", None), raw_id,
            )
            await self.leave_groups()
            await self._refuse(refusal)
            return
        self.session_id = session_id
        self.group = session_group(session_id)
        await self.accept()
        if bad_after:
            await self._reject_frame("the URL's after must be a whole number")
        elif first is not None:
            html, cursor, count = first
            self.cursor = after
            if count:
                await self.send(text_data=html)
                self.cursor = cursor
            if count == BATCH:
                await self.catch_up()

    async def _refuse(self, code: int) -> None:
        # Accept, then close with an application code: a refusal during the
        # handshake reaches the browser as 1006, which htmx would retry forever.
        await self.accept()
        await self.close(code=code)

    def _over_rate(self) -> bool:
        """A token bucket per socket: BURST at once, then SOCKET_MESSAGES_PER_SECOND."""
        now = time.monotonic()
        rate = settings.SOCKET_MESSAGES_PER_SECOND
        tokens, last = getattr(self, "_bucket", (float(BURST), now))
        tokens = min(float(BURST), tokens + (now - last) * rate) - 1
        self._bucket = (tokens, now)
        return tokens < 0

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.group is None:
            # Refused at connect (it has no session): a page sends its hello as soon as its socket
            # opens, which can be before the refusal's close reaches it. SocketConsumer.dispatch drops
            # such frames once the refusal's close is sent; this stays in case one comes before it.
            # (Handling it raised, and Daphne then dropped the connection: the browser saw 1006
            # instead of the refusal's code.)
            return
        if self._over_rate():
            logger.warning("session socket %s: user %s sent too many messages; closing", self.session_id, self.scope["user"].pk)
            html = render_to_string("sessions/socket_error.html", {"message": "This page sent too many messages too fast; reload it to reconnect."})
            await self.send(text_data=html)
            await self.close(code=CLOSE_TOO_MANY)
            return
        if text_data is None or len(text_data) > MAX_FRAME:
            await self._reject_frame("frames must be short JSON text")
            return
        try:
            frame = json.loads(text_data)
        except ValueError:
            await self._reject_frame("not JSON")
            return
        if not isinstance(frame, dict):
            await self._reject_frame("not a JSON object")
            return
        if "copilotSessionId" in frame:
            logger.warning("deprecated socket field copilotSessionId: the session is the socket's URL (/ws/sessions/<id>/)")
            if str(frame.pop("copilotSessionId")) != str(self.session_id):
                await self._reject_frame("copilotSessionId names another session than this socket's")
                return
        if frame.get("type") in LEGACY_DECISIONS:
            logger.warning(
                "deprecated socket frame %r: send {\"type\": \"decide\", \"request\", \"decision\", \"feedback\", \"edits\"}",
                frame.get("type"),
            )
            approved = frame.get("approved")
            resolution = frame.get("resolution") or ("approved" if approved is True else "rejected" if approved is False else "")
            frame = {
                "type": "decide",
                "request": frame.get("approval_id"),
                "legacy_resolution": resolution,
                "feedback": frame.get("feedback") or "",
                "edits": frame.get("modifications") or {},
                "door": "legacy_api",
            }
        if frame.get("type") == "decide":
            await self._decide(frame)
        elif frame.get("type") == "hello":
            after = _after(frame.get("after", 0))
            if after is None:
                await self._reject_frame("hello.after must be a whole number")
            elif self.cursor is not None:
                # Caught up at connect (the URL's after): what was sent since is on its way to the page.
                self.cursor = max(self.cursor, after)
            else:
                self.cursor = after
                await self.catch_up()
        elif frame.get("type") == "ping":
            await self.send(text_data=json.dumps({"type": "pong"}))
        else:
            await self._reject_frame(f"unknown frame type {str(frame.get('type'))[:40]!r}")

    async def _decide(self, frame: dict) -> None:
        message = await database_sync_to_async(_decide_from_socket)(self.scope["user"], self.session_id, frame)
        if message:
            await self._reject_frame(message)

    async def _reject_frame(self, why: str) -> None:
        logger.info("session socket %s: malformed frame (%s)", getattr(self, "session_id", "?"), why)
        html = render_to_string("sessions/socket_error.html", {"message": f"The page sent a message the server could not read: {why}."})
        await self.send(text_data=html)

    async def session_event(self, message: dict) -> None:
        if self.cursor is None or message.get("seq", 0) <= self.cursor:
            return  # no hello yet (it will catch up), or already shown
        if message.get("first", message["seq"]) == self.cursor + 1 and message.get("html"):
            # The very next events, rendered once by their writer: send them as they are.
            await self.send(text_data=message["html"])
            self.cursor = message["seq"]
        else:
            await self.catch_up()  # a gap (dropped or reordered notes): read the rows

    async def catch_up(self) -> None:
        assert self.cursor is not None
        while True:
            html, cursor, count = await _render_after(self.session_id, self.cursor)
            if count:
                await self.send(text_data=html)
                self.cursor = cursor
            if count < BATCH:
                return


class SessionListConsumer(SocketConsumer):
    """The session list's socket: a new status badge and event count whenever one of the user's sessions changes status."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        await self.join(owner_group(user.pk))

    async def receive(self, text_data=None, bytes_data=None) -> None:
        return None  # nothing to say: the list only listens

    async def session_status(self, event: dict) -> None:
        try:
            label = Session.Status(event["status"]).label
        except ValueError:
            return
        row = {"pk": event["session"], "status": event["status"], "get_status_display": label, "last_seq": event.get("last_seq", "")}
        html = render_to_string("sessions/badge.html", {"session": row, "oob": True}) + render_to_string(
            "sessions/event_count.html", {"session": row, "oob": True}
        )
        await self.send(text_data=html)

