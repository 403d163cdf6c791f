"""Channel-layer configuration, shared by settings and the tests that check it."""
from __future__ import annotations

from typing import Any


def redis_layer(url: str, prefix: str = "cmbagent") -> dict[str, Any]:
    return {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 times reads out after 5 s by default, which races the
            # 5 s blocking read channels-redis uses to receive: an idle socket's
            # consumer would die with a TimeoutError. Give reads more room.
            "hosts": [{"address": url, "socket_timeout": 15}],
            "prefix": prefix,
        },
    }
