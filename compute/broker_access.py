"""The portal's side of a host's broker access: its Redis ACL user, its broker URL, publishing to it.

Each host gets a Redis ACL user `h.<host hex>` whose only keys are `h.<host hex>:*` (its Celery queue and
kombu's bookkeeping under kombu's `global_keyprefix`, and the portal's questions to it) and whose only
commands are those kombu, Celery's worker and the host's agent use. Its password is the host's own
credential: the ACL holds only the credential's sha256 (`#<hex>`, exactly `HostCredential.secret_hash`),
so a rotation or revocation of the credential is one of the broker user too, and nothing else is stored.

The portal's own connection (Redis' `default` user, password-protected by `requirepass`) keeps its access
to everything. The users are written with `ACL SETUSER` when a credential is issued, removed when it is
revoked, and written again from the credential rows at the portal's start and every sweep of the beat
(a restarted Redis has forgotten them; the rows are the truth, no ACL file to keep in step).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from django.conf import settings

from compute.host.broker import broker_user, host_id_of_queue, key_prefix

log = logging.getLogger(__name__)

# What a host's connections run, and nothing more (no @admin, @dangerous, KEYS, SCAN, CONFIG, ACL, FLUSH*,
# no pub/sub: remote control and events are off on host workers).
HOST_COMMANDS = (
    # kombu's Redis transport: consume (BRPOP), publish (LPUSH), ack and restore (unacked hash, its index
    # and mutex, in MULTI/EXEC transactions under WATCH), queue bindings (sets), sizes, purge.
    "brpop", "rpop", "lpush", "rpush", "llen", "del", "exists",
    "sadd", "srem", "smembers",
    "hset", "hget", "hdel", "hlen",
    "zadd", "zrem", "zrevrangebyscore",
    "set", "get", "pexpire", "expire",
    "watch", "unwatch", "multi", "exec", "discard",
    # redis-py's Lock (kombu's unacked_mutex) releases with a Lua script; scripts run with the user's ACL.
    "evalsha", "script|load",
    # The agent's answers to the portal's questions (compute.host.rpc).
    "blpop",
    # Connection housekeeping.
    "ping", "select", "client|setname", "client|getname", "client|id",
)  # fmt: skip


def acl_rules(host_id: Any, secret_hash: str) -> list[str]:
    """`ACL SETUSER` arguments for the host: everything reset first, then exactly what it may do."""
    prefix = key_prefix(host_id)
    return [
        "reset",
        "on",
        f"#{secret_hash}",
        f"~{prefix}*",
        f"&{prefix}*",
        *(f"+{command}" for command in HOST_COMMANDS),
    ]


@cache
def _admin() -> redis.Redis:
    """The portal's own connection (the `default` user)."""
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=5)


def grant(host_id: Any, secret_hash: str) -> None:
    """Write the host's broker user with this credential; connections made with an older one are cut."""
    client = _admin()
    user = broker_user(host_id)
    current = client.acl_getuser(user)
    client.execute_command("ACL", "SETUSER", user, *acl_rules(host_id, secret_hash))
    if current and list(current.get("passwords") or []) != [secret_hash]:
        _disconnect(client, user)  # a rotation: the old password's sessions end now, not at their next AUTH


def revoke(host_id: Any) -> None:
    """Remove the host's broker user; its open connections are closed at once."""
    client = _admin()
    user = broker_user(host_id)
    client.execute_command("ACL", "DELUSER", user)
    _disconnect(client, user)


def _disconnect(client: redis.Redis, user: str) -> None:
    # "No such user": DELUSER closed its connections already.
    with contextlib.suppress(redis.exceptions.ResponseError):
        client.execute_command("CLIENT", "KILL", "USER", user)


def sync_broker_users() -> dict[str, int]:
    """Make Redis' host users match the credential rows: one per host with a credential in force, no
    other `h.*` user. Idempotent; sessions are cut only where a password changed."""
    from compute.models import HostCredential

    client = _admin()
    wanted = {
        broker_user(host_id): (host_id, secret_hash)
        for host_id, secret_hash in HostCredential.objects.filter(revoked_at__isnull=True).values_list(
            "host_id", "secret_hash"
        )
    }
    existing = {name.decode() if isinstance(name, bytes) else str(name) for name in client.acl_users()}
    written = removed = 0
    for user, (host_id, secret_hash) in wanted.items():
        current = client.acl_getuser(user) if user in existing else None
        same_password = bool(current) and list(current.get("passwords") or []) == [secret_hash]
        if same_password and _rules_match(current, host_id):
            continue
        grant(host_id, secret_hash)
        written += 1
    for user in existing - set(wanted):
        if user.startswith("h.") and len(user) == 34:
            client.execute_command("ACL", "DELUSER", user)
            _disconnect(client, user)
            removed += 1
    return {"written": written, "removed": removed}


def _rules_match(current: dict[str, Any], host_id: Any) -> bool:
    def listed(name: str) -> list[str]:
        value = current.get(name) or []
        return [value] if isinstance(value, str) else [str(item) for item in value]

    return (
        "on" in listed("flags")
        and listed("keys") == [f"~{key_prefix(host_id)}*"]
        and listed("channels") == [f"&{key_prefix(host_id)}*"]
        and set(listed("commands")) == {f"+{command}" for command in HOST_COMMANDS}
    )


def agent_broker_url(host_id: Any) -> str:
    """The broker URL a joined host is given: the broker's address as hosts reach it
    (`BULKHEAD_AGENT_REDIS_URL`, else the portal's own REDIS_URL), with the host's user and no password
    (the agent adds its credential, see `compute.host.broker.url_with_credential`)."""
    base = getattr(settings, "BULKHEAD_AGENT_REDIS_URL", "") or settings.REDIS_URL
    parts = urlsplit(base)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{broker_user(host_id)}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path or "/0", "", ""))


# --- publishing to a host's queue ----------------------------------------------------------------------

_connections: dict[str, Any] = {}
_connections_lock = threading.Lock()


def _forget_connections() -> None:
    _connections.clear()


os.register_at_fork(after_in_child=_forget_connections)


@contextmanager
def producer_for_queue(queue: str) -> Iterator[Any]:
    """A Celery producer whose keys land where the queue's consumer reads them: under the host's prefix
    for `host.<id>`, or None (Celery's own pool) for the portal's queues."""
    host_id = host_id_of_queue(queue)
    if host_id is None:
        yield None
        return
    from kombu.pools import producers

    from portal.celery import app

    prefix = key_prefix(host_id)
    with _connections_lock:
        connection = _connections.get(prefix)
        if connection is None:
            connection = app.connection_for_write(transport_options={"global_keyprefix": prefix})
            _connections[prefix] = connection
    with producers[connection].acquire(block=True, timeout=10) as producer:
        yield producer
