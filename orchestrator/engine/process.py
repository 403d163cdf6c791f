"""One run, one child process.

A run's engine (the autogen team, the model clients, the code runner) lives in
a process of its own. Each worker process keeps one launcher: a fresh Python
started with multiprocessing's ``forkserver`` (spawned, so it never holds the
worker's sockets or database connections) that has already imported autogen
and the engine. Every run is a fork of that launcher, so it starts in
milliseconds instead of re-importing everything, and still shares nothing with
the worker but the pipes it is handed. A worker keeps a spare forked ahead
(it rehearses a short offline run, so its pages are its own), so the next run
need not wait even for the fork. The child receives the run's spec (the task,
the mode, the event log so far, the answer to apply, the environment) and
writes one JSON line per message on its protocol pipe:

* ``{"type": "event", "event": {...}, "checkpoint": {...}}`` for each engine event;
* ``{"type": "outcome", "status": ..., "reason": ...}`` when the run ends;
* ``{"type": "fatal", "error": ..., "detail": ...}`` when it cannot start or go on.

The parent owns persistence: it writes each event with its checkpoint before
it counts as done, so a child killed at any instant loses at most events that
were never stored, and those are produced again on resume. The child dies
with its launcher (``PR_SET_PDEATHSIG``), which dies with the worker; it limits
its own memory and leads its own process group, so killing the group also
ends any code it runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import multiprocessing
import multiprocessing.context
import os
import resource
import signal
import threading
import time
import traceback
import weakref
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

STDERR_TAIL = 4_000
LINE_LIMIT = 64 * 1024 * 1024  # a single event line (a large tool output) may be big, not unbounded
REFILL_DELAY = 0.3  # seconds from handing a spare a run to forking the next spare
MEMORY_CHECK_SECONDS = 0.05
EXIT_OVER_MEMORY = 70
OUT_OF_MEMORY_SIGNS = ("MemoryError", "memory allocation of", "Cannot allocate memory", "out of memory")
PIPE_ROOM = 60 * 1024  # what a pipe takes without the writer waiting (Linux holds 64 KiB)


# --- the child ----------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)


async def _serve(spec: dict[str, Any], out) -> None:
    from orchestrator.engine import SwarmOrchestrator
    from orchestrator.engine.events import EngineEvent
    from orchestrator.engine.hitl import Answer, AnswerError, Policy
    from orchestrator.engine.models import ModelConfig, ModelConfigError, check_reachable

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, separators=(",", ":")) + "\n")
        out.flush()

    try:
        model = ModelConfig.from_env(provider=spec.get("provider") or None)
        engine = SwarmOrchestrator(
            task=spec["task"],
            mode=spec["mode"],
            work_dir=Path(spec["work_dir"]),
            model=model,
            max_turns=spec.get("max_turns"),
            auto_continue=int(spec.get("auto_continue") or 0),
            policy=Policy(**spec.get("policy", {})),
        )
        await check_reachable(model)
        history = [EngineEvent.from_dict(raw) for raw in spec.get("history", [])]
        answer = spec.get("answer")
        stream = engine.resume(history, Answer.from_dict(answer)) if answer else engine.run(history)
        async for event, checkpoint in stream:
            send({"type": "event", "event": event.to_dict(), "checkpoint": checkpoint})
    except ModelConfigError as exc:
        send({"type": "fatal", "error": "model_config", "detail": str(exc)})
        return
    except AnswerError as exc:
        send({"type": "fatal", "error": "answer", "detail": f"The answer no longer fits the session: {exc}"})
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent with its cause
        traceback.print_exc()
        send({"type": "fatal", "error": "crash", "detail": f"{type(exc).__name__}: {exc}"})
        return
    outcome = engine.outcome
    send({"type": "outcome", "status": outcome.status if outcome else "failed", "reason": outcome.reason if outcome else ""})


def _guard_memory(statm: int, limit: int) -> None:
    """End the process, saying why, when its resident memory goes over ``limit`` bytes (``statm``: an open
    /proc/self/statm).

    Runs on a thread started while memory is still there. Python does not
    always fail cleanly when memory runs out (a thread that cannot start for
    want of it leaves its starter waiting for ever), so the run is ended from
    here instead, with a cause its worker reports.
    """
    while True:
        time.sleep(MEMORY_CHECK_SECONDS)
        _end_if_over(statm, limit)


def _end_if_over(statm: int, limit: int) -> None:
    """End the process, saying why, if its resident memory (``statm``: an open /proc/self/statm) is over ``limit``."""
    if int(os.pread(statm, 64, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE") > limit:
        os.write(2, b"MemoryError: the run's process went over its memory limit\n")
        os._exit(EXIT_OVER_MEMORY)


def _prepare(env: dict[str, str], memory_limit_mb: int) -> None:
    """Give the run's process the run's environment and memory limit."""
    os.environ.clear()
    os.environ.update(env)
    # autogen logs every model call and message as an event at WARNING and below; the run's
    # events are its protocol lines, so only real problems reach the worker's stderr drain.
    logging.getLogger("autogen_core.events").setLevel(logging.ERROR)
    logging.getLogger("autogen_core").setLevel(logging.ERROR)
    if memory_limit_mb:
        limit = memory_limit_mb * 1024 * 1024
        # Checked once at once: a run whose spec alone is over its limit never starts (a fast one could
        # end before the guard's first look).
        statm = os.open("/proc/self/statm", os.O_RDONLY)
        _end_if_over(statm, limit)
        threading.Thread(target=_guard_memory, args=(statm, limit), name="memory-guard", daemon=True).start()
        # A backstop for growth faster than the guard looks: address space beyond what the process
        # already maps (the launcher's, shared) plus twice its limit.
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 * limit, mapped + 2 * limit))


def _child(inbox: Connection, protocol: Connection, errors: Connection, rehearse: bool) -> None:
    """A run's process (a fork of the launcher): it waits for its run on ``inbox``, writes the run's
    messages on ``protocol`` and its stderr to ``errors``.

    A spare (``rehearse``) first plays a short offline run, so that the pages
    the engine writes to are its own before a person waits on it.
    """
    os.dup2(errors.fileno(), 2)
    os.dup2(errors.fileno(), 1)  # anything a library prints goes to stderr, never into the protocol
    errors.close()
    out = os.fdopen(os.dup(protocol.fileno()), "w", encoding="utf-8")
    protocol.close()
    os.setsid()  # its own process group: killing it ends the code it runs too
    _die_with_parent(os.getppid())
    if rehearse:
        from orchestrator.engine.prefork import rehearse as rehearsal

        rehearsal()
    try:
        spec = json.loads(inbox.recv_bytes())
    except EOFError:  # a spare its worker no longer needs
        return
    inbox.close()
    _prepare(spec.pop("env", {}), int(spec.get("memory_limit_mb") or 0))
    # Not asyncio.run: its cleanup starts a thread, and a thread that cannot start for want of memory
    # leaves its starter waiting for ever. The process ends right after this; nothing needs cleaning.
    loop = asyncio.new_event_loop()
    loop.run_until_complete(_serve(spec, out))
    out.close()


def _warm() -> None:
    """Nothing: a first fork that waits until the launcher has imported the engine."""


# The modules every run needs, imported once by the launcher rather than by each run.
PRELOAD = ["orchestrator.engine", "orchestrator.engine.process", "autogen_ext.models.openai", "autogen_ext.models.replay", "orchestrator.engine.prefork"]


MAIN_SCRIPT_ENV = "CMBAGENT_LAUNCHER_MAIN"


def launcher() -> multiprocessing.context.ForkServerContext:
    """This process's run launcher (started on first use, then kept)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    _start_launcher()
    return context


_launcher_lock = threading.Lock()


@functools.cache
def _main_script() -> str:
    """The path of this program's main script, as multiprocessing hands it to a forked process ("" for ``-m``)."""
    from multiprocessing import spawn

    return spawn.get_preparation_data("launcher").get("init_main_from_path", "")


def _start_launcher() -> None:
    """Start the launcher if it is not running, telling it the program's main script.

    multiprocessing runs the parent's main script (``manage.py``, a benchmark)
    again in every forked process, as ``__mp_main__``, before the process's
    target starts, unless the launcher imported that script itself. Python
    3.11's forkserver means to (its preload's ``"__main__"``) but never
    receives the script's path, so the launcher imports it
    (``prefork``), named by this variable: once, rather than once per run.
    """
    from multiprocessing import forkserver

    main = _main_script()
    with _launcher_lock:
        if main:
            os.environ[MAIN_SCRIPT_ENV] = main
        try:
            forkserver.ensure_running()
        finally:
            os.environ.pop(MAIN_SCRIPT_ENV, None)


def warm_launcher() -> None:
    """Start the launcher and wait until it has imported the engine (blocking: about a second, once per process)."""
    process = launcher().Process(target=_warm, name="cmbagent-warm")
    process.start()
    process.join()


# --- the parent ---------------------------------------------------------------

# Processes forked ahead of need, per event loop (their pipes belong to it); each waits for a run.
_SPARES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[EngineProcess]] = weakref.WeakKeyDictionary()
_REFILLS: set[asyncio.Task[None]] = set()


class EngineProcess:
    """The parent's handle on a run's child process."""

    def __init__(
        self, process: multiprocessing.process.BaseProcess, protocol: asyncio.StreamReader, errors: asyncio.StreamReader,
        *, inbox: Connection,
    ) -> None:
        self.process = process
        self._inbox: Connection | None = inbox
        self.returncode: int | None = None
        self._protocol = protocol
        self._errors = errors
        self._stderr: list[bytes] = []
        loop = asyncio.get_running_loop()
        self._stderr_task = loop.create_task(self._drain_stderr())
        self._exited = loop.create_future()
        loop.add_reader(process.sentinel, self._on_exit)

    @classmethod
    async def spawn(cls, spec: dict[str, Any], *, spares: int = 0) -> EngineProcess:
        """Start ``spec``'s run in a process of its own: a spare forked earlier if there is one, else a new fork
        of this process's launcher. With ``spares``, keep that many forked and waiting for the next runs."""
        loop = asyncio.get_running_loop()
        waiting = _SPARES.setdefault(loop, [])
        child = None
        while waiting and child is None:
            candidate = waiting.pop(0)
            if candidate.returncode is None:
                child = candidate
        if child is None:
            child = await cls._fork(rehearse=False)
        try:
            await child._hand(spec)
        except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
            child.kill()
            raise RuntimeError(f"the run's process ended before it received its run: {child.stderr_tail()[-400:]}") from exc
        if spares:
            # Forked (and rehearsed) a moment later: until its first events are out, this run has the CPU.
            refill = loop.create_task(cls.keep_spares(spares, after=REFILL_DELAY))
            _REFILLS.add(refill)
            refill.add_done_callback(_REFILLS.discard)
        return child

    @classmethod
    async def keep_spares(cls, count: int, *, after: float = 0.0) -> None:
        """Have ``count`` processes forked and waiting for the next runs of this event loop (``after`` seconds)."""
        await asyncio.sleep(after)
        waiting = _SPARES.setdefault(asyncio.get_running_loop(), [])
        waiting[:] = [spare for spare in waiting if spare.returncode is None]
        while len(waiting) < count:
            waiting.append(await cls._fork(rehearse=True))

    @classmethod
    def discard_spares(cls) -> None:
        """End the processes forked ahead for this event loop (its worker stops serving)."""
        for spare in _SPARES.pop(asyncio.get_running_loop(), []):
            spare.kill()
            if spare._inbox is not None:
                spare._inbox.close()

    @classmethod
    async def _fork(cls, *, rehearse: bool) -> EngineProcess:
        """Fork a process from the launcher and connect its pipes; it waits for its run."""
        loop = asyncio.get_running_loop()
        readers = []
        ends = []
        inbox_r, inbox_w = multiprocessing.Pipe(duplex=False)
        try:
            for limit in (LINE_LIMIT, 2**16):
                read_fd, write_fd = os.pipe()
                ends.append(Connection(write_fd, readable=False))
                reader = asyncio.StreamReader(limit=limit, loop=loop)
                await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), os.fdopen(read_fd, "rb", 0))
                readers.append(reader)
            process = launcher().Process(target=_child, args=(inbox_r, *ends, rehearse), name="cmbagent-run", daemon=True)
            # Blocks for the fork only (a few ms) once the launcher is warm (``warm_launcher``). Not in a
            # thread: multiprocessing reads each child's exit status from its sentinel, and so does
            # ``_on_exit``; both must read it on this one thread.
            process.start()
        finally:
            inbox_r.close()
            for end in ends:
                end.close()  # the child holds its own copies: EOF comes when it ends
        return cls(process, *readers, inbox=inbox_w)

    async def _hand(self, spec: dict[str, Any]) -> None:
        """Send the run to the waiting process: at once if it fits the pipe, else from a thread (a long event log)."""
        inbox, self._inbox = self._inbox, None
        payload = json.dumps({**spec, "env": dict(os.environ)}).encode()
        try:
            if len(payload) < PIPE_ROOM:
                inbox.send_bytes(payload)
            else:
                await asyncio.to_thread(inbox.send_bytes, payload)
        finally:
            inbox.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self.process.sentinel)
        self.returncode = self.process.exitcode  # the launcher reports it on the sentinel
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def _drain_stderr(self) -> None:
        size = 0
        while chunk := await self._errors.read(8192):
            self._stderr.append(chunk)
            size += len(chunk)
            while size > STDERR_TAIL * 4 and len(self._stderr) > 1:
                size -= len(self._stderr.pop(0))

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """The child's messages, in order, until it closes its output."""
        while True:
            try:
                line = await self._protocol.readline()
            except ValueError:  # a line over LINE_LIMIT: the child is misbehaving
                self.kill()
                raise
            if not line:
                return
            yield json.loads(line)

    def ready(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` whole messages already read from the pipe, without waiting."""
        found: list[dict[str, Any]] = []
        buffer = self._protocol._buffer  # noqa: SLF001 - asyncio has no non-blocking readline
        while len(found) < limit:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            found.append(json.loads(line))
        if found:
            self._protocol._maybe_resume_transport()  # noqa: SLF001 - the room made lets a paused pipe flow again
        return found

    def kill(self) -> None:
        """End the child and everything it started, at once."""
        for kill in (os.killpg, os.kill):  # its group, and the child itself if it has not made its group yet
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(self.process.pid, signal.SIGKILL)

    async def wait(self) -> int:
        code = await asyncio.shield(self._exited)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._stderr_task, timeout=2)
        return code

    def stderr_tail(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")[-STDERR_TAIL:]

    def describe_exit(self, code: int) -> str:
        """Why the child ended, in words."""
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            cause = f"it was killed by {name}"
            if -code == signal.SIGKILL:
                cause += " (out of memory, or killed from outside)"
        elif code == EXIT_OVER_MEMORY:
            cause = "it went over its memory limit"
        else:
            cause = f"it exited with code {code}"
        tail = self.stderr_tail().strip().splitlines()
        # Python's MemoryError, a native library's failed allocation (Rust, C): the line that says so.
        memory = [line for line in tail if any(sign in line for sign in OUT_OF_MEMORY_SIGNS)]
        if memory and code != EXIT_OVER_MEMORY:
            cause += "; it ran out of memory"
        said = memory[-1] if memory else tail[-1] if tail else ""
        return cause + (f": {said}" if said else "")
