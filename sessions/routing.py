from __future__ import annotations

from channels.auth import AuthMiddleware
from django.urls import re_path

from sessions.consumers import SessionConsumer, SessionListConsumer

# Any id segment reaches the consumer, so that a malformed one gets a clean
# 4404 close instead of a routing error. The session socket looks its user up
# itself, in the one database trip of its connect (the user, the session and
# the first events together); every other socket has channels' AuthMiddleware.
websocket_urlpatterns = [
    re_path(r"^ws/sessions/$", AuthMiddleware(SessionListConsumer.as_asgi())),
    re_path(r"^ws/sessions/(?P<session_id>[^/]{1,64})/$", SessionConsumer.as_asgi()),
]
