"""``manage.py runworker orchestrator``: a run worker in a process of its own (scaled out)."""
from __future__ import annotations

from channels.layers import InMemoryChannelLayer
from channels.management.commands import runworker
from django.core.management.base import CommandError

from orchestrator.consumers import OrchestratorWorker


class Command(runworker.Command):
    help = "Run queued agent runs in this process (with REDIS_URL and a shared database), beside the web servers."
    worker_class = OrchestratorWorker

    def handle(self, *args, **options):
        from channels.layers import get_channel_layer

        if isinstance(get_channel_layer(options.get("layer", "default")), InMemoryChannelLayer):
            raise CommandError(
                "runworker needs a channel layer shared with the servers: set REDIS_URL (and DATABASE_URL). "
                "On the embedded default the worker already runs inside `manage.py serve`."
            )
        super().handle(*args, **options)
