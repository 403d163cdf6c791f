from __future__ import annotations

from django.urls import re_path

from approvals.consumers import ApprovalQueueConsumer

websocket_urlpatterns = [re_path(r"^ws/approvals/$", ApprovalQueueConsumer.as_asgi())]
