"""Pieces the benchmarks share: free loopback ports, logged child processes, a spawned helper
process spoken to over a pipe, and process memory. No Django here: the benchmarks' own
processes hold asyncio WebSocket clients, which must not share a process with Daphne's Twisted."""
from __future__ import annotations

import functools
import multiprocessing as mp
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE / MIB
    except (OSError, IndexError, ValueError):
        return 0.0


class LoggedProcess:
    """A child process (a server, a worker) run from the project's folder with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path) -> None:
        self.name, self.log = name, log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log_file.close()


class PipeHelper:
    """A spawned process running ``target(conn)``, asked over a pipe: ``request(*cmd)`` → its answer."""

    def __init__(self, target: Callable, name: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.name = name
        self.process = ctx.Process(target=target, args=(child,), name=name, daemon=True)
        self.process.start()

    def request(self, *cmd):
        self.conn.send(cmd)
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.name} failed:\n{result}")
        return result

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.request("stop")
            except (OSError, EOFError, RuntimeError):
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


@functools.lru_cache(maxsize=None)
def autobahn_client(*, quiet: bool = False) -> tuple[type, type]:
    """(factory class, protocol class) of an asyncio WebSocket client whose events go to ``factory.owner``.

    Imported on first use, in the client process only: ``django.setup()`` imports Daphne,
    which pins txaio (autobahn's backend) to Twisted. ``quiet``: no log line per socket
    whose closing handshake times out.
    """
    import txaio

    txaio.use_asyncio()
    if quiet:
        txaio.set_global_log_level("error")
    from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol

    class Protocol(WebSocketClientProtocol):
        def onOpen(self) -> None:  # noqa: N802 - autobahn's names
            self.factory.owner.on_open(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            self.factory.owner.on_message(time.monotonic_ns(), payload)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
            self.factory.owner.on_close(code, reason)

    return WebSocketClientFactory, Protocol

