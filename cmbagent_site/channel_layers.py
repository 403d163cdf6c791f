"""Channel-layer configuration, shared by settings and the tests that check it."""
from __future__ import annotations

import os
from typing import Any

REDIS_MAX_CONNECTIONS = int(os.environ.get("REDIS_MAX_CONNECTIONS", "2000"))


def redis_layer(url: str, prefix: str = "cmbagent") -> dict[str, Any]:
    return {
        # channels-redis's layer with two leaks of socket churn stopped: see redis_layer.py.
        "BACKEND": "cmbagent_site.redis_layer.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 times reads out after 5 s by default, which races the
            # 5 s blocking read channels-redis uses to receive: an idle socket's
            # consumer would die with a TimeoutError. Give reads more room.
            #
            # redis-py 8 also caps a pool at 100 connections and raises (not waits)
            # past that: with more than 100 sockets joining or sending at once a
            # consumer died with MaxConnectionsError. Each operation holds a
            # connection only while it runs, so a higher cap costs nothing idle.
            "hosts": [{"address": url, "socket_timeout": 15, "max_connections": REDIS_MAX_CONNECTIONS}],
            "prefix": prefix,
        },
    }
