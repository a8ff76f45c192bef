"""The cache's wire format: JSON, never pickle.

Django's Redis cache pickles values by default, so anyone who can write a key in Redis could run code in
every portal process that reads it. Values here are JSON; integers stay plain so that Redis INCR works.
"""

from __future__ import annotations

import json
from typing import Any


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
