"""Serve the app with Daphne, with the run worker on the server's event loop."""
from __future__ import annotations

import asyncio
import logging

from daphne.server import Server  # installs Twisted's asyncio reactor: import first
from django.conf import settings
from django.core.management.base import BaseCommand

logger = logging.getLogger("orchestrator")


class Command(BaseCommand):
    help = "Serve the app with Daphne; on the embedded default the run worker runs inside this process."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--no-worker", action="store_true", help="do not start the embedded run worker")

    def handle(self, *args, host: str, port: int, no_worker: bool, **options) -> None:
        from cmbagent_site.asgi import application
        from orchestrator.worker import RunWorker

        embedded = settings.EMBEDDED_WORKER and not no_worker
        worker_task: list[asyncio.Task[None]] = []

        def ready() -> None:
            if embedded:
                worker = RunWorker()
                worker_task.append(asyncio.get_event_loop().create_task(worker.serve(), name="embedded-worker"))
            self.stdout.write(f"Serving on http://{host}:{port}/ (worker {'in this process' if embedded else 'elsewhere'})", ending="\n")
            self.stdout.flush()

        endpoint = f"tcp:port={port}:interface={host.strip('[]')}"
        Server(application=application, endpoints=[endpoint], ready_callable=ready).run()
