"""The staff queue's socket: re-renders the queue (with the page's own filters) whenever a request comes or goes."""
from __future__ import annotations

import logging

from django.core.paginator import Paginator
from django.http import QueryDict
from django.template.loader import render_to_string

from approvals.services import QUEUE_GROUP
from cmbagent_site.db import database_sync_to_async
from cmbagent_site.sockets import SocketConsumer

logger = logging.getLogger(__name__)
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403


class ApprovalQueueConsumer(SocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not await database_sync_to_async(user.has_perm)("approvals.approvals"):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.params = QueryDict(self.scope.get("query_string", b"").decode("latin-1"))
        await self.join(QUEUE_GROUP)
        # The queue as it is now: whatever came or went between the page's render and this
        # socket (or during a reconnect) is never missed.
        await self.send(text_data=await self._rows())

    async def receive(self, text_data=None, bytes_data=None) -> None:
        return None  # the page only sends its hello; the queue is re-rendered on changes

    @database_sync_to_async
    def _rows(self) -> str:
        from approvals.views import KINDS, pending_for

        pending, filters = pending_for(self.scope["user"], self.params)
        page = Paginator(pending.order_by("-created_at"), 25).get_page(self.params.get("page"))
        return render_to_string(
            "approvals/queue.html#rows", {"page": page, **filters, "kinds": KINDS, "query": self.params.urlencode()}
        )

    async def approvals_changed(self, event: dict) -> None:
        await self.send(text_data=await self._rows())
