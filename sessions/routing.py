from __future__ import annotations

from django.urls import re_path

from sessions.consumers import SessionConsumer, SessionListConsumer

# Any id segment reaches the consumer, so that a malformed one gets a clean
# 4404 close instead of a routing error.
websocket_urlpatterns = [
    re_path(r"^ws/sessions/$", SessionListConsumer.as_asgi()),
    re_path(r"^ws/sessions/(?P<session_id>[^/]{1,64})/$", SessionConsumer.as_asgi()),
]
