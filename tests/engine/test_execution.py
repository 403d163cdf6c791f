"""The code runner: limits and confinement of agent code."""
from __future__ import annotations

import os
import subprocess

import pytest

from orchestrator.engine.execution import CodeRunner

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="confinement drops to an unprivileged user, which needs root")


async def test_output_and_files_are_reported(tmp_path):
    result = await CodeRunner(tmp_path / "run").execute("open('out.txt', 'w').write('hi')\nprint('done')")
    assert result.ok and result.stdout == "done\n"
    assert [a["path"] for a in result.artifacts] == ["out.txt"] and result.artifacts[0]["size"] == 2


async def test_endless_loop_is_stopped_at_the_time_limit(tmp_path):
    result = await CodeRunner(tmp_path, timeout=1.0).execute("while True:\n    pass\n")
    assert result.timed_out and not result.ok and "time limit exceeded" in result.summary()


async def test_memory_bomb_is_refused(tmp_path):
    result = await CodeRunner(tmp_path, memory_bytes=256 * 1024 * 1024).execute("x = bytearray(2 * 1024 ** 3)\n")
    assert result.exit_code != 0 and "MemoryError" in result.stderr


@needs_root
async def test_fork_bomb_is_contained_and_cleaned_up(tmp_path):
    """Forks hit the process limit; at the time limit the whole process group is killed."""
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = await CodeRunner(tmp_path, timeout=2.0).execute(code)
    assert result.timed_out
    assert _processes_in(tmp_path) == []


def _processes_in(folder) -> list[int]:
    """Pids of live processes whose working directory is ``folder``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == str(folder):
                    found.append(int(entry))
            except OSError:
                pass
    return found


async def test_process_finder_sees_a_running_child(tmp_path):
    """The check used above finds a process that is still running in the folder."""
    child = subprocess.Popen(["sleep", "5"], cwd=tmp_path)
    try:
        assert _processes_in(tmp_path) == [child.pid]
    finally:
        child.kill()
        child.wait()


@needs_root
async def test_writes_outside_the_working_directory_are_denied(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    code = f"open({str(outside / 'x.txt')!r}, 'w').write('escaped')\n"
    result = await CodeRunner(tmp_path / "run").execute(code)
    assert result.exit_code != 0 and "PermissionError" in result.stderr
    assert not (outside / "x.txt").exists()


async def test_symlinks_are_not_followed_into_artifacts(tmp_path):
    """A link to a file elsewhere is not read back as an artifact."""
    result = await CodeRunner(tmp_path / "run").execute("import os\nos.symlink('/etc/hostname', 'leak.txt')\n")
    assert result.ok and result.artifacts == []
