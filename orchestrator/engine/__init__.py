"""The agent engine: autogen AgentChat teams, free of Django.

Everything in this package is plain Python + autogen so that the web worker,
a script and a terminal command all run the same engine.
"""
from __future__ import annotations

from orchestrator.engine.events import EngineEvent, EventKind
from orchestrator.engine.modes import Mode
from orchestrator.engine.swarm import RunOutcome, SwarmOrchestrator

__all__ = ["EngineEvent", "EventKind", "Mode", "RunOutcome", "SwarmOrchestrator"]
