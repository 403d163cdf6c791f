"""Running agent code: a child process per execution, in the run's own folder.

Each code block is written to a script under ``.code/`` in the working
directory and run by a fresh interpreter (``-I``: no user site, no PYTHON*
variables) with a wall-time limit and resource limits. Files the code writes
in the working directory become artifacts.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import ctypes
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
OUTPUT_LIMIT = 20_000  # characters of stdout/stderr kept per execution


@dataclass(slots=True)
class ExecutionResult:
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def summary(self) -> str:
        if self.timed_out:
            head = "Execution stopped: time limit exceeded."
        else:
            head = f"exitcode: {self.exit_code} ({'execution succeeded' if self.ok else 'execution failed'})"
        parts = [head]
        if self.stdout:
            parts.append("Code output:\n" + self.stdout)
        if self.stderr:
            parts.append("Errors:\n" + self.stderr)
        if self.artifacts:
            parts.append("Files written: " + ", ".join(a["path"] for a in self.artifacts))
        return "\n".join(parts)


UNPRIVILEGED_ID = 65534  # "nobody": agent code never runs as root
MAX_PROCESSES = 64
MAX_FILE_BYTES = 256 * 1024 * 1024
PR_SET_PDEATHSIG = 1


def _limit_child(memory_bytes: int, cpu_seconds: int, drop_to: int | None) -> None:
    # Runs in the child between fork and exec: a session of its own so that the
    # whole process group can be killed, hard limits on memory, CPU time, file
    # size and processes, and (when started as root) an unprivileged user, so
    # that the process limit applies and files outside the working directory
    # are out of reach.
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if drop_to is not None:
        os.setgroups([])
        os.setgid(drop_to)
        os.setuid(drop_to)
    resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))
    # Last, as a change of user clears it: die with the run's process, so that
    # cancelling or killing a run never leaves its code running on.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _runs_as(uid: int, interpreter: str) -> bool:
    def drop() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    try:
        return subprocess.run([interpreter, "-I", "-c", "pass"], preexec_fn=drop, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def sandbox_identity() -> tuple[str, int | None]:
    """The interpreter and user agent code runs as: unprivileged whenever possible.

    Started as root, code runs as "nobody" with an interpreter that user can
    reach (this one if it can, else the system's python3); only if none can
    does it stay root, with a warning in the log. A machine fact, probed once.
    """
    if os.geteuid() != 0:
        return sys.executable, None
    for interpreter in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if interpreter and _runs_as(UNPRIVILEGED_ID, interpreter):
            return interpreter, UNPRIVILEGED_ID
    logger.warning("no interpreter is usable by uid %d: agent code will run as root", UNPRIVILEGED_ID)
    return sys.executable, None


def _snapshot(work_dir: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for path in work_dir.rglob("*"):
        rel = path.relative_to(work_dir)
        # Links are never followed: code could point one at a file it may not read.
        if rel.parts[0] == ".code" or path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        files[rel.as_posix()] = (stat.st_mtime_ns, stat.st_size)
    return files


def _artifact(work_dir: Path, rel: str) -> dict[str, Any]:
    path = work_dir / rel
    data = path.read_bytes()
    return {
        "path": rel,
        "kind": "image" if path.suffix.lower() in IMAGE_SUFFIXES else "data",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


class CodeRunner:
    """Runs Python code blocks for one run, each in a child process."""

    def __init__(
        self,
        work_dir: Path,
        *,
        timeout: float = 30.0,
        memory_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.timeout = timeout
        self.memory_bytes = memory_bytes
        self.executions = 0

    async def execute(self, code: str) -> ExecutionResult:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        scripts = self.work_dir / ".code"
        scripts.mkdir(exist_ok=True)
        self.executions += 1
        script = scripts / f"block_{self.executions:03d}.py"
        script.write_text(code, encoding="utf-8")
        interpreter, drop_to = sandbox_identity()
        if drop_to is not None:
            os.chown(self.work_dir, drop_to, drop_to)
            self.work_dir.chmod(0o700)
            # Every session's code runs as that one user: the folder holding the sessions' folders is
            # closed to it, so code can neither list nor enter another session's folder (nor climb to
            # the database). The child enters its own folder before dropping privileges.
            parent = self.work_dir.parent
            if parent.stat().st_uid == os.geteuid():
                parent.chmod(0o700)
        before = _snapshot(self.work_dir)
        cpu = int(self.timeout) + 1
        proc = await asyncio.create_subprocess_exec(
            interpreter,
            "-I",
            # The code comes on stdin: the child enters the working directory
            # before it drops privileges, so the folders above it need not be
            # open to that user. The .code/ file is the record of what ran.
            "-",
            cwd=self.work_dir,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "MPLBACKEND": "Agg",
                "HOME": str(self.work_dir),
                "TMPDIR": str(self.work_dir),
            },
            preexec_fn=lambda: _limit_child(self.memory_bytes, cpu, drop_to),
        )
        timed_out = False
        try:
            out, err = await asyncio.wait_for(proc.communicate(code.encode("utf-8")), timeout=self.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = await proc.communicate()
            if not timed_out:
                raise
        after = _snapshot(self.work_dir)
        changed = sorted(rel for rel, sig in after.items() if before.get(rel) != sig)
        return ExecutionResult(
            exit_code=proc.returncode,
            stdout=out.decode("utf-8", "replace")[-OUTPUT_LIMIT:],
            stderr=err.decode("utf-8", "replace")[-OUTPUT_LIMIT:],
            timed_out=timed_out,
            artifacts=[_artifact(self.work_dir, rel) for rel in changed],
        )
