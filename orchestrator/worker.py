"""The run worker: claims queued runs through the database lease and executes them.

On the embedded default it lives inside the Daphne process (``manage.py serve``
starts it on the server's event loop); scaled out it runs in processes of its
own. Either way the worker, not a socket or a request, owns every run: closing
a browser changes nothing.

Each engine event is written (Event row + state checkpoint, one transaction)
and announced to the session's group after commit by the service.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import InterfaceError, OperationalError

from cmbagent_site.db import database_sync_to_async
from orchestrator.engine.events import EngineEvent, EventKind
from orchestrator.engine.hitl import Policy
from orchestrator.engine.process import EngineProcess, warm_launcher
from sessions import selectors, services
from sessions.groups import WORKER_CHANNEL
from sessions.models import Event, Run, Session

logger = logging.getLogger(__name__)

SCHEMA_RETRY_SECONDS = 5
STOP_POLL_SECONDS = 0.5  # how often a running run checks for Cancel or Suspend
BATCH_EVENTS = 100  # the most events one transaction writes for a run
# How long a run's first write waits for the run's first reply to join it. A run's first lines (its
# task, its phase) come a moment before the first reply of a fast model: one write, not two, then
# brings that reply to the page sooner. A slow model's reply never comes that soon; its task waits this.
FIRST_WRITE_WAIT = 0.005
# How long a run's next write waits for its first write's announcement to go out (see ``execute``).
FIRST_ANNOUNCE_WAIT = 0.1
TAIL_KINDS = {EventKind.TASK, EventKind.MESSAGE, EventKind.HANDOFF, EventKind.TOOL_CALL, EventKind.TOOL_RESULT}


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _database_unreachable(exc: BaseException) -> bool:
    """The database cannot be reached (restarting, failing over, a dropped connection): not the run's fault.

    A lost or refused connection carries no SQLSTATE, or one of class 08
    (connection exception) or 57P (the server is shutting down or starting);
    any other error (a statement the server rejected) is the run's own failure.
    """
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    sqlstate = getattr(exc.__cause__, "sqlstate", None)
    return not sqlstate or sqlstate.startswith(("08", "57P"))


def _unapplied_migrations() -> list:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    return executor.migration_plan(executor.loader.graph.leaf_nodes())


def _read_session_and_log(session_id) -> tuple[Session, list[EngineEvent]]:
    """The session and its log as engine events."""
    return Session.objects.get(pk=session_id), selectors.engine_history(session_id)


_session_and_log = database_sync_to_async(_read_session_and_log)  # one trip to the database thread


@dataclasses.dataclass
class Claimed:
    """A run this worker just claimed, with what its execution needs, read in the same trip to the database."""

    run: Run
    session: Session
    history: list[EngineEvent]
    notes: list[services.Note]  # the claim's announcements, not yet sent


def _claim(*, worker_id: str, lease_seconds: int, exclude: set[int]) -> tuple[Claimed | None, list[services.Note]]:
    """Claim a run and read its session and log (on the database thread); announcements are kept, not sent."""
    with services.announcements_held() as notes:
        run = services.run_claim(worker_id=worker_id, lease_seconds=lease_seconds, exclude=exclude)
    if run is None:
        return None, notes  # the claim may have recorded runs stopped while their worker was gone
    # The session as the claim wrote it (kept on the run by run_claim), and the log.
    return Claimed(run, run.session, selectors.engine_history(run.session_id), notes), []


def _kept(write: Callable, **kwargs):
    """``write(**kwargs)`` on the database thread, returning its result and its announcements, unsent."""
    with services.announcements_held() as notes:
        result = write(**kwargs)
    return result, notes


# Announcements being sent, held until sent: the event loop keeps only weak references to its tasks, and an
# Announcer may be dropped at once (a claim that found no run but recorded stopped ones).
_SENDING: set[asyncio.Task[None]] = set()


class Announcer:
    """Sends one run's announcements in the order of its writes, on the event loop, so that a write returns as
    soon as it commits and the run's next write need not wait for the channel layer."""

    def __init__(self) -> None:
        self._last: asyncio.Task[None] | None = None

    def send(self, notes: list[services.Note]) -> None:
        if notes:
            self._last = asyncio.get_running_loop().create_task(self._send(self._last, notes))
            _SENDING.add(self._last)
            self._last.add_done_callback(_SENDING.discard)

    @staticmethod
    async def _send(previous: asyncio.Task[None] | None, notes: list[services.Note]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            if any(callable(message) for _, _, message in notes):
                notes = await database_sync_to_async(services.prepare_announcements)(notes)
            await services.send_announcements(notes)
        except Exception:  # noqa: BLE001 - the rows are written; the pages catch up from them
            logger.warning("could not announce a run's events", exc_info=True)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until everything given to :meth:`send` has been sent (or ``timeout`` seconds have passed)."""
        if self._last is not None:
            await asyncio.wait([self._last], timeout=timeout)

    def cancel(self) -> None:
        if self._last is not None:
            self._last.cancel()


OPENING_KINDS = {EventKind.TASK, EventKind.PHASE}  # what a run writes before its team's first reply


def _is_reply(line: dict) -> bool:
    """A line past a run's opening: what its team did (a message, a call, a request), or the run's end."""
    return line["type"] != "event" or line["event"]["kind"] not in OPENING_KINDS


async def _wait_for_a_reply(child: EngineProcess, lines: list[dict]) -> None:
    """Add to ``lines`` what ``child`` writes until a reply is among them, for up to FIRST_WRITE_WAIT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIRST_WRITE_WAIT
    while not any(_is_reply(line) for line in lines) and len(lines) < BATCH_EVENTS and loop.time() < deadline:
        await asyncio.sleep(0.0005)
        lines += child.ready(BATCH_EVENTS - len(lines))


class RunWorker:
    """Claims runs and executes up to ``max_runs`` of them at once."""

    def __init__(
        self,
        *,
        worker_id: str | None = None,
        max_runs: int | None = None,
        lease_seconds: int | None = None,
        poll_interval: float = 2.0,
    ) -> None:
        self.worker_id = worker_id or new_worker_id()
        self.max_runs = max_runs or settings.WORKER_MAX_RUNS
        self.lease_seconds = lease_seconds or settings.WORKER_LEASE_SECONDS
        self.poll_interval = poll_interval
        # What this process is doing right now; dropped as each run ends.
        self.active: dict[int, asyncio.Task[None]] = {}
        # The child process of each active run (run id → process), for logs and tests.
        self.children: dict[int, EngineProcess] = {}
        # Each executing run's claim (its write fence) and where to record a stop: one watcher serves them all.
        self.watched: dict[int, tuple[str, EngineProcess, dict[str, str]]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.spares = 0  # processes kept forked ahead (set when serving; a one-off execute forks its run)

    # The worker serving in this process, woken by the orchestrator channel's consumer.
    in_this_process: RunWorker | None = None

    def wake(self) -> None:
        """Look for work now rather than at the next poll."""
        self._wake.set()

    async def serve(self, *, listen: bool = True) -> None:
        """Claim and run work until cancelled.

        With ``listen``, this worker reads the ``orchestrator`` channel itself
        (the embedded default); under ``runworker`` the Channels worker reads it
        and its consumer calls :meth:`wake`. Polling goes on either way, so a
        channel-layer outage only slows pickup down.
        """
        RunWorker.in_this_process = self
        await self._wait_for_schema()
        # The launcher every run's process is forked from: started now, so the first run starts at once.
        await asyncio.to_thread(warm_launcher)
        # A serving worker keeps processes forked ahead, so a run starts without waiting even for the fork.
        self.spares = settings.WORKER_SPARE_PROCESSES
        await EngineProcess.keep_spares(self.spares)
        logger.info("worker %s serving (up to %d runs)", self.worker_id, self.max_runs)
        listener = asyncio.get_running_loop().create_task(self._listen()) if listen else None
        last_reclaim = -math.inf
        try:
            while True:
                # Not at every wake-up (each Start wakes the workers): a queued run is claimed at once.
                if time.monotonic() - last_reclaim >= self.poll_interval:
                    last_reclaim = time.monotonic()
                    await self._reclaim_orphans()
                await self.claim_available()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
                self._wake.clear()
        finally:
            EngineProcess.discard_spares()
            if listener is not None:
                listener.cancel()
            if self._watcher is not None:
                self._watcher.cancel()
            if RunWorker.in_this_process is self:
                RunWorker.in_this_process = None

    async def _listen(self) -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        while True:
            try:
                await layer.receive(WORKER_CHANNEL)
                self.wake()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a channel-layer outage must not stop the worker; polling goes on
                logger.warning("worker %s could not read its channel; polling", self.worker_id, exc_info=True)
                await asyncio.sleep(self.poll_interval)

    async def _wait_for_schema(self) -> None:
        """Wait, saying why, until the database is reachable and migrated."""
        while True:
            try:
                pending = await database_sync_to_async(_unapplied_migrations)()
            except Exception as exc:  # noqa: BLE001 - unreachable database: say so and wait
                problem = f"the database cannot be reached ({type(exc).__name__}: {exc})"
            else:
                if not pending:
                    return
                problem = f"the database is not migrated ({len(pending)} migrations pending; run `manage.py migrate`)"
            logger.error("worker %s cannot start: %s; trying again in %ss", self.worker_id, problem, SCHEMA_RETRY_SECONDS)
            await asyncio.sleep(SCHEMA_RETRY_SECONDS)

    async def _reclaim_orphans(self) -> None:
        try:
            found = await database_sync_to_async(services.run_reclaim_orphans)(host=socket.gethostname(), alive=_pid_alive)
        except Exception:  # noqa: BLE001 - the database may be restarting; next poll
            logger.warning("worker %s could not look for orphaned runs", self.worker_id, exc_info=True)
            return
        if found:
            logger.warning("worker %s: %d run(s) of a dead worker on this host will be taken over", self.worker_id, found)

    async def claim_available(self) -> None:
        while len(self.active) < self.max_runs:
            try:
                claimed, notes = await database_sync_to_async(_claim)(
                    worker_id=self.worker_id, lease_seconds=self.lease_seconds, exclude=set(self.active)
                )
            except Exception:  # noqa: BLE001 - the database may be restarting; try again next poll
                logger.warning("worker %s could not claim runs", self.worker_id, exc_info=True)
                return
            if claimed is None:
                Announcer().send(notes)
                return
            run = claimed.run
            task = asyncio.get_running_loop().create_task(self.execute(run, claimed=claimed), name=f"run-{run.pk}")
            self.active[run.pk] = task
            task.add_done_callback(lambda _t, pk=run.pk: self._ended(pk))

    def _ended(self, run_id: int) -> None:
        self.active.pop(run_id, None)
        self.wake()  # room for another run

    async def _watch(self) -> None:
        """Keep the leases of every run this worker executes, and end a run's process at once when a person
        asks to stop it: two queries every half second for all of them, however many, timed by the clock."""
        last_beat = time.monotonic()
        while self.watched:
            await asyncio.sleep(STOP_POLL_SECONDS)
            held = {pk: owner for pk, (owner, _, _) in self.watched.items()}
            beat = time.monotonic() - last_beat >= self.lease_seconds / 3
            try:
                stops, lost = await database_sync_to_async(services.runs_watch)(
                    held=held, lease_seconds=self.lease_seconds, beat=beat
                )
            except Exception:  # noqa: BLE001 - the database may be restarting; the lease has slack
                logger.warning("worker %s could not check its runs", self.worker_id, exc_info=True)
                continue
            if beat:
                last_beat = time.monotonic()
            for pk in lost:
                if pk in self.watched:
                    _, child, stop = self.watched.pop(pk)
                    logger.warning("worker %s lost the lease of run %s; ending its process", self.worker_id, pk)
                    stop["lost"] = "lease"
                    child.kill()
            for pk, request in stops.items():
                if pk in self.watched:
                    _, child, stop = self.watched.pop(pk)
                    stop["request"] = request
                    child.kill()

    def _watch_run(self, run_id: int, owner: str, child: EngineProcess, stop: dict[str, str]) -> None:
        self.watched[run_id] = (owner, child, stop)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name=f"watch-{self.worker_id}")

    async def execute(self, run: Run, *, observer: Callable[[Event], None] | None = None, claimed: Claimed | None = None) -> None:
        """Run the engine for ``run`` in a child process and persist every event it yields.

        ``observer``, if given, sees each Event row after it is committed.
        ``claimed``: the run's session and log, read with its claim by :meth:`claim_available`.
        """
        tail: collections.deque[dict] = collections.deque(maxlen=services.HISTORY_TAIL)
        announcer = Announcer()
        kept = database_sync_to_async(_kept)

        async def append(**kwargs) -> list[Event]:
            rows, notes = await kept(services.events_append, **kwargs)
            announcer.send(notes)
            return rows
        status, detail = Run.Status.FAILED, ""
        stop: dict[str, str] = {}
        child: EngineProcess | None = None
        owner = run.lease_owner or self.worker_id  # this claim's fence
        try:
            # A continued or taken-over run goes on from the log: nothing repeated.
            if claimed is not None:
                session, history = claimed.session, claimed.history
            else:
                session, history = await _session_and_log(run.session_id)
            spec = {
                "task": session.task,
                "mode": session.mode,
                "work_dir": str(Path(settings.RUNS_DIR) / str(session.pk)),
                "provider": session.model_provider,
                "max_turns": session.config.get("max_turns"),
                "auto_continue": int(session.config.get("auto_continue", 0)),
                "policy": dataclasses.asdict(Policy.for_session(session.mode, session.config)),
                "history": [event.to_dict() for event in history],
                "answer": run.answer,
                "memory_limit_mb": settings.RUN_MEMORY_LIMIT_MB,
            }
            try:
                child = await EngineProcess.spawn(spec, spares=self.spares)
            finally:
                if claimed is not None:
                    announcer.send(claimed.notes)  # "running": made and sent while the run's process starts
            self.children[run.pk] = child
            self._watch_run(run.pk, owner, child, stop)
            outcome: dict | None = None
            fatal: dict | None = None
            first_write = True
            async for first in child.messages():
                # Whatever else the run wrote while the last batch was committing goes in this one.
                lines = [first, *child.ready(BATCH_EVENTS - 1)]
                if first_write:
                    await _wait_for_a_reply(child, lines)
                events: list[EngineEvent] = []
                checkpoint: dict | None = None
                for message in lines:
                    if message["type"] == "event":
                        event = EngineEvent.from_dict(message["event"])
                        if event.kind in TAIL_KINDS:
                            tail.append({"agent": event.agent, "kind": str(event.kind), "content": event.content[:2000]})
                        events.append(event)
                        checkpoint = message["checkpoint"]
                    elif message["type"] == "outcome":
                        outcome = message
                    elif message["type"] == "fatal":
                        fatal = message
                if events:
                    rows = await append(
                        session_id=session.pk,
                        run_id=run.pk,
                        events=events,
                        checkpoint=checkpoint,
                        conversation_tail=list(tail),
                        worker_id=owner,
                    )
                    if observer is not None:
                        for row in rows:
                            observer(row)
                if first_write:
                    # A page is waiting for the run's first events (its first reply, unless the model is
                    # slower than FIRST_WRITE_WAIT): they go out before the next write takes the database
                    # thread (and the GIL, rendering) from the event loop's send. Bounded, so a channel layer
                    # that hangs (or, under load, the claim's note queued for its render) holds the run back
                    # once, briefly, and never again.
                    first_write = False
                    await announcer.drain(timeout=FIRST_ANNOUNCE_WAIT)
            code = await child.wait()
            if stop.get("request"):
                status = stop["request"]
                detail = "Cancelled as asked." if status == Run.Status.CANCELLED else "Suspended as asked; Resume goes on from here."
            elif stop.get("lost"):
                return  # another worker holds the run now
            elif fatal is not None:
                detail = fatal["detail"]
                await append(session_id=session.pk, run_id=run.pk, events=[EngineEvent(EventKind.ERROR, content=detail)], worker_id=owner)
            elif outcome is None:
                detail = f"The run's process ended unexpectedly: {child.describe_exit(code)}. Retry goes on from the last saved event."
                logger.warning("run %s: %s", run.pk, detail)
                await append(session_id=session.pk, run_id=run.pk, events=[EngineEvent(EventKind.ERROR, content=detail)], worker_id=owner)
            elif outcome["status"] == "completed":
                status, detail = Run.Status.COMPLETED, "The team finished the task."
            elif outcome["status"] == "paused":
                status, detail = Run.Status.PAUSED, f"The round budget is spent ({outcome['reason']}); Continue gives a fresh one."
            elif outcome["status"] == "waiting":
                status = Run.Status.WAITING_APPROVAL
                detail = f"Waiting for a person to answer the {outcome['reason'].replace('_', ' ')} request."
            elif outcome["status"] == "cancelled":
                status, detail = Run.Status.CANCELLED, f"The run was {outcome['reason']}."
            else:
                detail = outcome["reason"]
        except asyncio.CancelledError:
            # This worker is shutting down: hand the run back so another goes on from its log.
            stop["lost"] = "shutdown"
            announcer.cancel()
            if child is not None:
                child.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    database_sync_to_async(services.run_release)(
                        run_id=run.pk, worker_id=owner, detail="Its worker stopped; another worker will go on from here."
                    )
                )
            raise
        except services.LeaseLostError:
            stop["lost"] = "lease"
            logger.warning("worker %s: run %s was taken over; stopping its process", self.worker_id, run.pk)
        except Exception as exc:  # noqa: BLE001 - recorded as the run's failure, with its cause
            if _database_unreachable(exc):
                # Not a failure of the run, and nothing it did is lost: every committed event is in
                # its log. Its lease is no longer renewed; when it runs out, a worker (this one too)
                # takes the run over and goes on from the log, once the database answers again.
                stop["lost"] = "database"
                logger.warning(
                    "worker %s: run %s lost the database (%s: %s); it goes on from its log when its lease runs out",
                    self.worker_id, run.pk, type(exc).__name__, exc,
                )
            else:
                logger.exception("run %s failed", run.pk)
                detail = f"{type(exc).__name__}: {exc}"
        finally:
            self.children.pop(run.pk, None)
            self.watched.pop(run.pk, None)
            if child is not None and child.returncode is None:
                child.kill()
                with contextlib.suppress(Exception):
                    await asyncio.shield(child.wait())
            if not stop.get("lost"):
                try:
                    _, notes = await kept(services.run_finish, run_id=run.pk, worker_id=owner, status=status, detail=detail)
                    announcer.send(notes)
                    await announcer.drain()
                except Exception as exc:
                    if not _database_unreachable(exc):
                        raise
                    # Unrecorded, so still running under a lease no one renews: taken over from the log when it runs out.
                    logger.warning(
                        "worker %s could not record the end of run %s (%s: %s); it is taken over when its lease runs out",
                        self.worker_id, run.pk, type(exc).__name__, exc,
                    )
