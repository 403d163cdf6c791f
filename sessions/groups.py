"""Channel-layer names shared by the writers (services, worker) and the sockets."""
from __future__ import annotations

from uuid import UUID

WORKER_CHANNEL = "orchestrator"


def session_group(session_id: UUID | str) -> str:
    return f"session.{session_id}"


def owner_group(user_id: int) -> str:
    """Status changes of every session of one user, for their live session list."""
    return f"owner.{user_id}"

