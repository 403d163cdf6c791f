"""autogen's agent runtime without the bookkeeping nobody reads.

For every message it routes, autogen's ``SingleThreadedAgentRuntime`` opens
OpenTelemetry spans (with attributes that serialise the message), and builds
a log record for its event logger (serialising the message again), whether
or not anything listens. A run's process configures no tracer, and keeps the
event logger at ERROR (``process._prepare``): all that work is thrown away,
and on the two-agent replay run it was two fifths of the engine's CPU per
event (0.62 -> 0.37 ms; bench/README, *Now: the engine's own CPU halved*).

:func:`quiet` drops it from one runtime, and only when nobody would read it:
with a tracer provider set, all of it stays; with the event logger open at
INFO, the messages are still serialised for it.
It replaces three of the runtime's own members, so the versions are pinned
(pyproject.toml) and tests/engine/test_swarm.py checks they still exist.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

from autogen_core import EVENT_LOGGER_NAME, SingleThreadedAgentRuntime
from opentelemetry import trace

# The members replaced. The two methods are looked up on the runtime's class and the trace helper on the
# instance before anything is set, so a renamed or removed one fails loudly instead of being added unused.
TRACER, ATTRIBUTES, SERIALIZE = "_tracer_helper", "_create_otel_attributes", "_try_serialize"
UNLOGGED = "(not serialised: autogen's event logger is off)"


class _NoTracing:
    """What the runtime's trace helper offers it, doing nothing."""

    def trace_block(self, *args: Any, **kwargs: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()


async def _no_attributes(*args: Any, **kwargs: Any) -> dict[str, str]:
    return {}


def _unlogged(message: Any) -> str:
    return UNLOGGED


def tracing_configured() -> bool:
    """True when a tracer provider has been set for this process (OpenTelemetry's default is a proxy)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def quiet(runtime: SingleThreadedAgentRuntime) -> SingleThreadedAgentRuntime:
    """Turn off, on ``runtime``, the spans and event-log serialisation that nothing would read."""
    for name in (ATTRIBUTES, SERIALIZE):
        if not callable(getattr(SingleThreadedAgentRuntime, name, None)):
            raise AttributeError(f"autogen's runtime no longer has {name}; see orchestrator/engine/runtime.py")
    if not hasattr(runtime, TRACER):
        raise AttributeError(f"autogen's runtime no longer has {TRACER}; see orchestrator/engine/runtime.py")
    if tracing_configured():
        return runtime
    setattr(runtime, TRACER, _NoTracing())
    setattr(runtime, ATTRIBUTES, _no_attributes)
    if not logging.getLogger(EVENT_LOGGER_NAME).isEnabledFor(logging.INFO):
        setattr(runtime, SERIALIZE, _unlogged)
    return runtime


def quiet_team(team: Any) -> Any:
    """:func:`quiet` on the runtime an autogen team made for itself."""
    runtime = getattr(team, "_runtime", None)
    if not isinstance(runtime, SingleThreadedAgentRuntime):
        raise AttributeError(f"{type(team).__name__} no longer keeps its runtime in _runtime; see orchestrator/engine/runtime.py")
    quiet(runtime)
    return team
