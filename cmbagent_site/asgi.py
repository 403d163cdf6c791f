"""ASGI entry point: HTTP through Django, WebSockets through Channels."""
from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cmbagent_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402 - needs Django set up
from channels.sessions import SessionMiddlewareStack  # noqa: E402

from cmbagent_site.origin import OriginValidator  # noqa: E402
from orchestrator.consumers import WorkerConsumer  # noqa: E402
from sessions.groups import WORKER_CHANNEL  # noqa: E402
from approvals.routing import websocket_urlpatterns as approval_sockets  # noqa: E402
from sessions.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Each route has its own auth (see sessions.routing): the session socket reads its user with its session.
        "websocket": OriginValidator(SessionMiddlewareStack(URLRouter(websocket_urlpatterns + approval_sockets))),
        # Scaled out, `manage.py runworker orchestrator` hands this channel's messages to the worker.
        "channel": ChannelNameRouter({WORKER_CHANNEL: WorkerConsumer.as_asgi()}),
    }
)
