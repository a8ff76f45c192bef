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
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from django.conf import settings
from kombu.connection import ConnectionPool
from kombu.pools import ProducerPool, get_limit
from kombu.utils.functional import lazy

from compute.host.broker import broker_user, host_id_of_queue, key_prefix

log = logging.getLogger(__name__)

# What a host's connections run, and nothing more (no @admin, @dangerous, KEYS, SCAN, CONFIG, ACL, FLUSH*,
# no pub/sub: remote control and events are off on host workers).
HOST_COMMANDS = (
    # kombu's Redis transport: consume (BRPOP), publish (LPUSH), ack and restore (unacked hash, its index
    # and mutex, in MULTI/EXEC transactions under WATCH), queue bindings (sets), sizes, purge.
    "brpop", "rpop", "lpush", "rpush", "llen", "del", "exists",
    # The relay of a micro-VM's console (compute.host.console) takes its input with LPOP.
    "lpop",
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
    current = _acl_user(client, user)
    client.execute_command("ACL", "SETUSER", user, *acl_rules(host_id, secret_hash))
    if current and list(current.get("passwords") or []) != [secret_hash]:
        _disconnect(client, user)  # a rotation: the old password's sessions end now, not at their next AUTH


def revoke(host_id: Any) -> None:
    """Remove the host's broker user; its open connections are closed at once, and so is the portal's
    connection for publishing to it (nothing more is sent to a host that cannot take it)."""
    close_host_connection(host_id)
    client = _admin()
    user = broker_user(host_id)
    client.execute_command("ACL", "DELUSER", user)
    _disconnect(client, user)


def _acl_user(client: redis.Redis, user: str) -> dict[str, Any] | None:
    return cast("dict[str, Any] | None", client.acl_getuser(user))


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
    names = cast("list[Any]", client.acl_users())
    existing = {name.decode() if isinstance(name, bytes) else str(name) for name in names}
    written = removed = 0
    for user, (host_id, secret_hash) in wanted.items():
        current = _acl_user(client, user) if user in existing else None
        same_password = current is not None and list(current.get("passwords") or []) == [secret_hash]
        if current is not None and same_password and _rules_match(current, host_id):
            continue
        grant(host_id, secret_hash)
        written += 1
    for user in existing - set(wanted):
        if user.startswith("h.") and len(user) == 34:
            client.execute_command("ACL", "DELUSER", user)
            _disconnect(client, user)
            close_host_connection(_host_uuid(user))
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

# How many hosts keep a connection between publishes. Each costs a few descriptors (below); the least
# recently used beyond these are closed, and a later publish to that host opens one again.
HOST_CONNECTIONS = 32


class _HostConnection:
    """The portal's connection for publishing under one host's key prefix, with its own pools.

    kombu's shared `producers`/`connections` groups are not used: they keep a pool per connection for
    the life of the process, and a pool closed there stays in the group, closed, for an equal connection.
    What is open for a host (kombu 5.5's Redis transport): the epoll of this connection's transport (made
    when the pool copies the connection's settings), and for each pooled connection that published, its
    transport's epoll (the `MultiChannelPoller`) and its channel's two sockets (redis-py pools: `client`
    for the PING that opens the channel, `pool` for the LPUSH)."""

    def __init__(self, prefix: str) -> None:
        from portal.celery import app

        self.prefix = prefix
        self.connection = app.connection_for_write(transport_options={"global_keyprefix": prefix})
        limit = get_limit()
        self.producers = ProducerPool(_ConnectionPool(self.connection, limit=limit), limit=limit)
        self.users = 0  # publishers inside `producer_for_queue` now; guarded by `_connections_lock`
        self.retired = False

    def retire(self) -> bool:
        """Out of the cache (under the lock); True if nobody uses it, so the caller closes it now."""
        self.retired = True
        return self.users == 0

    def close(self) -> None:
        # The producers hold no descriptor of their own (each one's channel is a pooled connection's).
        try:
            self.producers.connections.force_close_all()
            _close_connection(self.connection)
        except Exception:  # a publish that went through is not failed by the closing after it
            log.warning("closing the broker connection for %s failed", self.prefix, exc_info=True)


def _close_connection(connection: Any) -> None:
    """Close a kombu connection and its transport's epoll: closing the connection closes its channels
    (their sockets) and unregisters them from the poller, but the poller's epoll is left to whoever frees
    the transport last (a reference held anywhere keeps it open)."""
    transport = connection._transport  # private: `connection.transport` would make one if it had none
    connection._close()  # as kombu's pool closes one: a pooled connection's `release` gives it back
    if transport is not None:
        transport.cycle.poller.close()


class _ConnectionPool(ConnectionPool):
    """kombu's pool of copies of a connection, whose closing also closes each copy's epoll."""

    def close_resource(self, resource: Any) -> None:
        _close_connection(resource)

    def collect_resource(self, resource: Any, socket_timeout: float | None = 0.1) -> None:
        if not isinstance(resource, lazy):  # a lazy one was never opened
            _close_connection(resource)


_connections: OrderedDict[str, _HostConnection] = OrderedDict()  # least recently used first
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
    prefix = key_prefix(host_id)
    closing: list[_HostConnection] = []
    with _connections_lock:
        host = _connections.get(prefix)
        if host is None:
            host = _connections[prefix] = _HostConnection(prefix)
        _connections.move_to_end(prefix)
        host.users += 1
        while len(_connections) > HOST_CONNECTIONS:
            _, oldest = _connections.popitem(last=False)
            if oldest.retire():
                closing.append(oldest)
    for idle in closing:
        idle.close()
    try:
        with host.producers.acquire(block=True, timeout=10) as producer:
            yield producer
    finally:
        with _connections_lock:
            host.users -= 1
            last = host.retired and host.users == 0
        if last:  # evicted or its host revoked while this publish used it
            host.close()


def close_host_connection(host_id: Any) -> None:
    """Close the portal's connection for publishing to the host (now, or when its last publish ends)."""
    with _connections_lock:
        host = _connections.pop(key_prefix(host_id), None)
        idle = host is not None and host.retire()
    if host is not None and idle:
        host.close()


def audit_broker_denials() -> int:
    """What Redis refused a host's broker user (its `ACL LOG`: a key, channel or command outside its
    grant, or a failed AUTH as a host user) into the audit log as `host.broker.denied`, then cleared.

    Redis 7.0's log has no entry ids, so the log is read and reset in one MULTI/EXEC (nothing slips in
    between); entries of other users are left out of the audit (the portal's own user is not a host)."""
    from compute.models import Host
    from tenants import audit
    from tenants.actors import Actor

    client = _admin()
    with client.pipeline(transaction=True) as pipe:
        pipe.execute_command("ACL", "LOG")
        pipe.execute_command("ACL", "LOG", "RESET")
        entries, _ = pipe.execute()
    recorded = 0
    by_user: dict[str, Host | None] = {}
    for raw in entries or []:
        entry = _acl_log_entry(raw)
        user = entry.get("username", "")
        if not (user.startswith("h.") and len(user) == 34):
            continue
        if user not in by_user:
            by_user[user] = Host.objects.filter(id=_host_uuid(user)).first()
        host = by_user[user]
        audit.record(
            Actor.system(f"host {host.name}" if host else user),
            "host.broker.denied",
            host,
            outcome="denied",
            object_type="host" if host is None else "",
            object_id=_host_uuid(user) if host is None else "",
            details={
                "reason": entry.get("reason", ""),
                "context": entry.get("context", ""),
                "object": entry.get("object", "")[:200],
                "count": int(entry.get("count") or 1),
                "address": _field(entry.get("client-info", ""), "addr"),
            },
        )
        recorded += 1
    return recorded


def _acl_log_entry(raw: Any) -> dict[str, str]:
    items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=False)
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in items
    }


def _field(client_info: str, name: str) -> str:
    for part in client_info.split():
        key, _, value = part.partition("=")
        if key == name:
            return value[:64]
    return ""


def _host_uuid(user: str) -> str:
    import uuid

    return str(uuid.UUID(user[2:]))
