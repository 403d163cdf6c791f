"""The baseline for bench/push_latency.py: a bare Channels consumer.

It does what any Channels push must do and nothing more: join a group on
connect, and on each group message send one text frame. The frame is a real
transcript fragment rendered by the app (written by push_latency.py to
BENCH_FRAGMENT_FILE) with its seq filled in, so the client receives the same
bytes as from the app's SessionConsumer. No database, no template rendering,
no auth.

Protocol, mirroring sessions.consumers.SessionConsumer:
    ws://HOST:PORT/ws/bare/<name>/     group "bench-bare.<name>"
    client -> {"type": "hello", "after": N}
    server -> {"type": "ready"}
    group message {"type": "bench.push", "seq": S} -> the fragment for S, if S > cursor

Served by Daphne, with the project's settings for the channel layer:
    DJANGO_SETTINGS_MODULE=cmbagent_site.settings REDIS_URL=... \
    BENCH_FRAGMENT_FILE=... daphne -b 127.0.0.1 -p PORT bench.bare_app:application
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cmbagent_site.settings")
django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402 - needs Django set up
from channels.routing import ProtocolTypeRouter  # noqa: E402

SEQ = "\x00seq\x00"  # where the seq goes in the fragment
_fragment_file = os.environ.get("BENCH_FRAGMENT_FILE")
FRAGMENT = (
    Path(_fragment_file).read_text(encoding="utf-8")
    if _fragment_file
    else f'<article id="event-{SEQ}" data-seq="{SEQ}">' + "x" * 1000 + "</article>"
)
READY = json.dumps({"type": "ready"})


class BareConsumer(AsyncWebsocketConsumer):
    group: str | None = None
    cursor: int | None = None

    async def connect(self) -> None:
        name = self.scope["path"].rstrip("/").rsplit("/", 1)[-1]
        self.group = f"bench-bare.{name}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        frame = json.loads(text_data or "{}")
        if frame.get("type") == "hello":
            self.cursor = int(frame.get("after", 0))
            await self.send(text_data=READY)

    async def bench_push(self, message: dict) -> None:
        seq = message["seq"]
        if self.cursor is not None and seq > self.cursor:
            self.cursor = seq
            await self.send(text_data=FRAGMENT.replace(SEQ, str(seq)))


application = ProtocolTypeRouter({"websocket": BareConsumer.as_asgi()})
