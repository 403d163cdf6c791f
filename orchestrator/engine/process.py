"""One run, one child process.

A run's engine (the autogen team, the model clients, the code runner) lives in
a process of its own, started fresh with ``python -m orchestrator.engine.process``
(spawned, never forked from a process holding sockets or database
connections). The parent sends it one JSON document on stdin (the task, the
mode, the event log so far, the answer to apply) and reads back one JSON line
per message:

* ``{"type": "event", "event": {...}, "checkpoint": {...}}`` for each engine event;
* ``{"type": "outcome", "status": ..., "reason": ...}`` when the run ends;
* ``{"type": "fatal", "error": ..., "detail": ...}`` when it cannot start or go on.

The parent owns persistence: it writes each event with its checkpoint and
only then reads the next line, so a child killed at any instant loses at most
events that were never stored, and those are produced again on resume. The
child dies with its parent (``PR_SET_PDEATHSIG``), limits its own memory, and
leads its own process group, so killing the group also ends any code it runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import sys
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

STDERR_TAIL = 4_000
LINE_LIMIT = 64 * 1024 * 1024  # a single event line (a large tool output) may be big, not unbounded


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


def main() -> None:
    parent = int(os.environ.get("CMBAGENT_PARENT_PID", os.getppid()))
    _die_with_parent(parent)
    # The protocol gets the real stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    spec = json.load(sys.stdin)
    # autogen logs every model call and message as an event at WARNING and below; the run's
    # events are its protocol lines, so only real problems reach the worker's stderr drain.
    logging.getLogger("autogen_core.events").setLevel(logging.ERROR)
    logging.getLogger("autogen_core").setLevel(logging.ERROR)
    limit = int(spec.get("memory_limit_mb") or 0)
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit * 1024 * 1024, limit * 1024 * 1024))
    asyncio.run(_serve(spec, out))
    out.close()


# --- the parent ---------------------------------------------------------------


class EngineProcess:
    """The parent's handle on a run's child process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._stderr: list[bytes] = []
        self._stderr_task = asyncio.get_running_loop().create_task(self._drain_stderr())

    @classmethod
    async def spawn(cls, spec: dict[str, Any]) -> EngineProcess:
        env = {**os.environ, "CMBAGENT_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator.engine.process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: killing it ends the code it runs too
            env=env,
            limit=LINE_LIMIT,
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(spec).encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await process.stdin.drain()
        process.stdin.close()
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        size = 0
        while chunk := await self.process.stderr.read(8192):
            self._stderr.append(chunk)
            size += len(chunk)
            while size > STDERR_TAIL * 4 and len(self._stderr) > 1:
                size -= len(self._stderr.pop(0))

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """The child's messages, in order, until it closes its output."""
        assert self.process.stdout is not None
        while True:
            try:
                line = await self.process.stdout.readline()
            except ValueError:  # a line over LINE_LIMIT: the child is misbehaving
                self.kill()
                raise
            if not line:
                return
            yield json.loads(line)

    def kill(self) -> None:
        """End the child and everything it started, at once."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def wait(self) -> int:
        code = await self.process.wait()
        with contextlib.suppress(asyncio.CancelledError):
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
        else:
            cause = f"it exited with code {code}"
        tail = self.stderr_tail().strip().splitlines()
        if any("MemoryError" in line for line in tail):
            cause += "; it ran out of memory"
        last = tail[-1] if tail else ""
        return cause + (f": {last}" if last else "")


if __name__ == "__main__":
    main()
