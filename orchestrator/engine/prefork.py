"""Imported last by the run launcher (``process.PRELOAD``), once, before it forks any run.

Importing this module readies the launcher for forking:

* it rehearses a short offline run in a temporary folder, so whatever autogen
  and the engine set up lazily on first use (schemas, compiled patterns,
  caches) is done once here rather than in every run;
* it then moves every object the launcher holds to the collector's permanent
  generation (``gc.freeze``). A forked run's first collection would otherwise
  walk, and so copy, every page of that heap: memory each run pays for and
  time before its first event.

It is not meant to be imported anywhere else.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
from pathlib import Path

from orchestrator.engine.models import ModelConfig
from orchestrator.engine.swarm import SwarmOrchestrator

logger = logging.getLogger(__name__)


async def _rehearse(work_dir: Path) -> int:
    engine = SwarmOrchestrator(
        task="Rehearsal of the run launcher.",
        mode="idea_generation",
        work_dir=work_dir,
        model=ModelConfig.from_env(env={}, provider="offline"),
        max_turns=6,
    )
    return len([event async for event, _ in engine.run([])])


def rehearse() -> None:
    """Play a short offline run in a temporary folder, and forget it."""
    try:
        with tempfile.TemporaryDirectory(prefix="cmbagent-rehearsal-") as folder:
            asyncio.run(_rehearse(Path(folder)))
    except Exception:  # noqa: BLE001 - a failed rehearsal only costs speed: the runs set up what it did not
        logger.warning("the run launcher's rehearsal failed", exc_info=True)


def _import_main() -> None:
    """Import the parent program's main script as ``__mp_main__`` (see ``process._start_launcher``): the
    forked runs then find it imported, instead of running it again each."""
    from multiprocessing import process, spawn

    from orchestrator.engine.process import MAIN_SCRIPT_ENV

    main = os.environ.pop(MAIN_SCRIPT_ENV, "")
    if not main:
        return
    process.current_process()._inheriting = True  # noqa: SLF001 - as multiprocessing itself does here
    try:
        spawn.import_main_path(main)
    except Exception:  # noqa: BLE001 - each run then imports it itself, as without this
        logger.warning("the run launcher could not import %s", main, exc_info=True)
    finally:
        del process.current_process()._inheriting  # noqa: SLF001


def _ready() -> None:
    _import_main()
    rehearse()
    gc.collect()
    gc.freeze()


_ready()
