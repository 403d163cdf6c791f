"""Channel-layer names shared by the writers (services, worker) and the sockets."""
from __future__ import annotations

from uuid import UUID

WORKER_CHANNEL = "orchestrator"


def session_group(session_id: UUID | str) -> str:
    return f"session.{session_id}"


def user_sessions_group(user_id: int) -> str:
    return f"user-sessions.{user_id}"
