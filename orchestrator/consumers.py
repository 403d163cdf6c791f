"""The orchestrator channel's consumer, for ``manage.py runworker orchestrator``."""
from __future__ import annotations

import asyncio
import logging

from channels.consumer import AsyncConsumer
from channels.worker import Worker

from orchestrator.worker import RunWorker

logger = logging.getLogger(__name__)


class WorkerConsumer(AsyncConsumer):
    """Receives ``run.wake`` notes: a run was queued, so the worker looks now instead of at its next poll."""

    async def run_wake(self, message: dict) -> None:
        worker = RunWorker.in_this_process
        if worker is not None:
            worker.wake()


class OrchestratorWorker(Worker):
    """The Channels worker with a run worker beside it, and listeners that outlive channel-layer outages."""

    async def handle(self) -> None:
        serving = asyncio.ensure_future(RunWorker().serve(listen=False))
        try:
            await super().handle()
        finally:
            serving.cancel()

    async def listener(self, channel: str) -> None:
        while True:
            try:
                await super().listener(channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - e.g. Redis restarting: keep polling the database, listen again soon
                logger.warning("channel %s: the channel layer failed; listening again in 2 s", channel, exc_info=True)
                await asyncio.sleep(2)
