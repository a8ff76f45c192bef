"""The cache's wire format: JSON, never pickle.

Django's Redis cache pickles values by default, so anyone who can write a key in Redis could run code in
every portal process that reads it. Values here are JSON; integers stay plain so that Redis INCR works.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient


class JSONSerializer:
    """Serializer for `django.core.cache.backends.redis.RedisCache` (OPTIONS["serializer"])."""

    def dumps(self, obj: Any) -> bytes | int:
        # bool is an int subclass; only true integers are stored raw so that incr() keeps working.
        if type(obj) is int:
            return obj
        return json.dumps(obj, separators=(",", ":")).encode()

    def loads(self, data: bytes | int) -> Any:
        if isinstance(data, int):
            return data
        try:
            return int(data)
        except ValueError:
            return json.loads(data)


# Connection pools by configuration, for the whole process. Django makes a cache object (and with it a
# client with pools of its own) per thread and per async context, i.e. per request under ASGI: each request
# connected to Redis anew (TCP + AUTH) for its throttle look-up and let the pool go with the request.
_shared_pools: dict[str, dict[int, Any]] = {}


class SharedPoolRedisCacheClient(RedisCacheClient):
    """Django's Redis cache client whose connection pools are shared by every cache object of the same
    configuration in the process. redis-py's pools are thread-safe and start afresh after a fork."""

    def __init__(self, servers: list[str], **options: Any) -> None:
        super().__init__(servers, **options)
        key = repr((list(servers), sorted(options.items(), key=lambda item: item[0])))
        self._pools = _shared_pools.setdefault(key, {})


class SharedPoolRedisCache(RedisCache):
    """`django.core.cache.backends.redis.RedisCache` on process-wide connection pools (BACKEND)."""

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
