"""Run processes: forked from a pre-imported launcher, never from the worker; spares; isolation."""
from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from orchestrator.engine import process as engine_process
from orchestrator.engine.process import EngineProcess, warm_launcher


def _spec(tmp_path: Path, **changes) -> dict:
    spec = {
        "task": "Propose ideas on CMB lensing.", "mode": "idea_generation", "work_dir": str(tmp_path / "work"),
        "provider": "offline", "max_turns": 50, "auto_continue": 0, "policy": {}, "history": [], "answer": None,
        "memory_limit_mb": 4096,
    }
    return {**spec, **changes}


async def _play(child: EngineProcess) -> tuple[list[dict], int]:
    messages = [message async for message in child.messages()]
    return messages, await child.wait()


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


@pytest.fixture(scope="module", autouse=True)
def launcher_ready():
    warm_launcher()


async def test_a_run_process_is_a_fork_of_the_launcher_and_holds_none_of_the_workers_sockets(tmp_path):
    """The launcher was spawned fresh, so a run inherits no socket or database connection of the worker."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        mine = f"socket:[{os.fstat(held.fileno()).st_ino}]"
        assert mine in _socket_inodes(os.getpid())
        await EngineProcess.keep_spares(1)
        [spare] = engine_process._SPARES[asyncio.get_running_loop()]
        launcher = _parent_of(spare.pid)
        assert launcher != os.getpid() and _parent_of(launcher) == os.getpid()
        assert b"multiprocessing.forkserver" in Path(f"/proc/{launcher}/cmdline").read_bytes()
        assert mine not in _socket_inodes(spare.pid)
        async with asyncio.timeout(5):  # leads its own group once started: killing the group ends the code it runs
            while os.getpgid(spare.pid) != spare.pid:
                await asyncio.sleep(0.01)
        child = await EngineProcess.spawn(_spec(tmp_path))
        assert child is spare
        messages, code = await _play(child)
    finally:
        held.close()
    assert code == 0 and messages[-1] == {"type": "outcome", "status": "completed", "reason": messages[-1]["reason"]}
    assert [m["event"]["kind"] for m in messages if m["type"] == "event"][:1] == ["task"]


async def test_a_spare_takes_the_next_run_and_another_is_forked_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_process, "REFILL_DELAY", 0.05)
    await EngineProcess.keep_spares(1)
    loop = asyncio.get_running_loop()
    [spare] = engine_process._SPARES[loop]
    child = await EngineProcess.spawn(_spec(tmp_path), spares=1)
    assert child.pid == spare.pid
    async with asyncio.timeout(10):
        while not engine_process._SPARES[loop]:
            await asyncio.sleep(0.02)
    [refill] = engine_process._SPARES[loop]
    assert refill.pid != child.pid and refill.returncode is None
    messages, code = await _play(child)
    assert code == 0 and messages[-1]["type"] == "outcome"
    # Without spares wanted, a run is forked when it starts and the spare is left waiting.
    other = await EngineProcess.spawn(_spec(tmp_path), spares=0)
    assert other.pid != refill.pid or engine_process._SPARES[loop] == []
    await _play(other)


async def test_a_spec_larger_than_a_pipe_reaches_the_run(tmp_path):
    task = "Propose ideas on CMB lensing. " + "x" * (3 * engine_process.PIPE_ROOM)
    messages, code = await _play(await EngineProcess.spawn(_spec(tmp_path, task=task)))
    assert code == 0
    [first] = [m["event"] for m in messages if m["type"] == "event"][:1]
    assert first["kind"] == "task" and first["content"] == task


async def test_a_run_over_its_memory_limit_ends_alone_with_its_cause(tmp_path):
    """A run whose process grows past its limit ends within moments, the cause named; a run beside it completes."""
    huge = "Propose ideas. " + "x" * (160 * 1024 * 1024)  # the spec alone takes the process far past 150 MB
    starved = await EngineProcess.spawn(_spec(tmp_path / "a", task=huge, memory_limit_mb=150))
    del huge
    healthy = await EngineProcess.spawn(_spec(tmp_path / "b"))
    async with asyncio.timeout(60):
        (starved_messages, starved_code), (healthy_messages, healthy_code) = await asyncio.gather(_play(starved), _play(healthy))
    cause = starved.describe_exit(starved_code)
    assert starved_code != 0 and not starved_messages
    # The guard ends it (its own exit code), or, for growth faster than the guard looks, the address-space backstop.
    assert "memory limit" in cause or "ran out of memory" in cause, cause
    assert healthy_code == 0 and healthy_messages[-1]["type"] == "outcome" and healthy_messages[-1]["status"] == "completed"


async def test_kill_ends_a_waiting_spare_and_its_exit_is_reported(tmp_path):
    await EngineProcess.keep_spares(1)
    [spare] = engine_process._SPARES[asyncio.get_running_loop()]
    spare.kill()
    assert await asyncio.wait_for(spare.wait(), 5) == -9
    assert "SIGKILL" in spare.describe_exit(-9)
    # A dead spare is never handed a run: the next run gets a process of its own.
    child = await EngineProcess.spawn(_spec(tmp_path))
    assert child.pid != spare.pid
    _, code = await _play(child)
    assert code == 0


async def test_spares_are_ended_when_their_worker_stops_serving():
    await EngineProcess.keep_spares(2)
    spares = list(engine_process._SPARES[asyncio.get_running_loop()])
    assert len(spares) == 2
    EngineProcess.discard_spares()
    for spare in spares:
        assert await asyncio.wait_for(spare.wait(), 5) is not None
    assert asyncio.get_running_loop() not in engine_process._SPARES


MAIN_SCRIPT = """
import asyncio, os, sys
sys.path.insert(0, {root!r})
with open({log!r}, "a") as log:
    log.write(__name__ + " " + str(os.getpid()) + "\\n")
if __name__ == "__main__":
    from orchestrator.engine.process import EngineProcess, warm_launcher
    spec = {spec!r}

    async def runs():
        for _ in range(3):
            child = await EngineProcess.spawn(spec)
            kinds = [m["type"] async for m in child.messages()]
            assert await child.wait() == 0 and kinds[-1] == "outcome", kinds[-3:]

    warm_launcher()
    asyncio.run(runs())
"""


def test_the_main_script_is_imported_once_by_the_launcher_not_again_by_every_run(tmp_path):
    """multiprocessing runs the parent's main script again in each forked process unless the launcher has
    it: three runs of a script started as ``python script.py`` execute the script twice in all (itself, and
    the launcher), never once per run."""
    import subprocess
    import sys

    root = str(Path(engine_process.__file__).resolve().parents[2])
    log = tmp_path / "imports.log"
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT.format(root=root, log=str(log), spec=_spec(tmp_path, max_turns=4)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    names = [line.split()[0] for line in log.read_text().splitlines()]
    assert names == ["__main__", "__mp_main__"], names
