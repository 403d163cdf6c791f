from __future__ import annotations

from channels.auth import AuthMiddleware
from django.urls import re_path

from approvals.consumers import ApprovalQueueConsumer

websocket_urlpatterns = [re_path(r"^ws/approvals/$", AuthMiddleware(ApprovalQueueConsumer.as_asgi()))]
