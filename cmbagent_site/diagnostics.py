"""A diagnostics view for tests and local debugging: the server loop's task count and the channel layer's buffers.

Off unless the server was started with ``CMBAGENT_DIAGNOSTICS=1``: the route
is then registered (see urls.py), and even so it answers only requests from a
loopback address. Behind a reverse proxy on the same host every request comes
from loopback, so keep it off in production; it shows counts only, never
names, users or content.
"""
from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections import Counter

from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse


def _from_loopback(request: HttpRequest) -> bool:
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def _coroutine_name(task: asyncio.Task) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", type(coro).__name__)


async def diagnostics(request: HttpRequest) -> JsonResponse:
    if not settings.DIAGNOSTICS or not _from_loopback(request) or request.method != "GET":
        raise Http404
    from channels.layers import get_channel_layer

    tasks = asyncio.all_tasks(asyncio.get_running_loop())
    layer = get_channel_layer()
    buffers = dict(getattr(layer, "receive_buffer", {}))  # channels-redis: process-local channel -> queued messages
    return JsonResponse(
        {
            "tasks": len(tasks),
            "task_kinds": Counter(_coroutine_name(t) for t in tasks).most_common(10),
            "threads": threading.active_count(),
            "layer": type(layer).__name__ if layer is not None else None,
            "receive_buffers": len(buffers),
            "buffered_messages": sum(queue.qsize() for queue in buffers.values()),
            "ended_channels": len(getattr(layer, "ended_channels", ())),
        }
    )
