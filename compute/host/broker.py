"""A host's place in the broker (Redis): its own key prefix, its own ACL user, its own connection URL.

Every key a host's worker and agent touch starts with `key_prefix(host_id)` (`h.<host hex>:`): its Celery
queue `host.<id>` and kombu's bookkeeping (`unacked`, `unacked_index`, `unacked_mutex`,
`_kombu.binding.*`, through kombu's `global_keyprefix` transport option), and the portal's questions
(`compute.host.rpc`). The portal gives each host a Redis ACL user of the same name confined to that prefix
(`compute.broker_access`), whose password is the host's own credential: a host holds no shared broker
password and cannot read another host's queue, bookkeeping or questions.

Django-free: both sides (the portal publishing to a host, the host consuming) derive names from here.
"""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

HOST_QUEUE_PREFIX = "host."
# A message header with what the operation is about (`portal.operations.peek_view`): the host's worker
# locks its target before claiming without asking first; the claim's answer is checked against it.
OPERATION_HEADER = "bulkhead_operation"
# A create's message header with the workload's spec as the portal resolved it when it queued it, for a
# workload with no secret values (those travel only in answers to the host's own requests, never through
# the broker): the host creates the container while its claim is answered, and starts it only once the
# claim's spec agrees (`compute.host.tasks.CreateWorkloadTask`).
SPEC_HEADER = "bulkhead_spec"
_PREFIX_PATTERN = re.compile(r"^h\.[0-9a-f]{32}:$")


def _hex(host_id: Any) -> str:
    return uuid.UUID(str(host_id)).hex


def key_prefix(host_id: Any) -> str:
    """The prefix of every broker key of the host (`h.<hex>:`)."""
    return f"h.{_hex(host_id)}:"


def broker_user(host_id: Any) -> str:
    """The host's Redis ACL user (`h.<hex>`)."""
    return f"h.{_hex(host_id)}"


def host_queue(host_id: Any) -> str:
    return f"{HOST_QUEUE_PREFIX}{host_id}"


def host_id_of_queue(queue: str) -> str | None:
    """The host a Celery queue belongs to (`host.<uuid>`), or None for the portal's own queues."""
    if not queue.startswith(HOST_QUEUE_PREFIX):
        return None
    try:
        return str(uuid.UUID(queue[len(HOST_QUEUE_PREFIX) :]))
    except ValueError:
        return None


def is_key_prefix(value: str) -> bool:
    return bool(_PREFIX_PATTERN.match(value))


def url_with_credential(url: str, credential: str) -> str:
    """`url` (`redis://h.<hex>@broker:6379/0`, written at join) with the host's credential as password.

    The credential is the one secret a host holds: agent.env keeps it once (BULKHEAD_HOST_CREDENTIAL) and
    a rotation replaces that one line. A URL that already carries a password is left alone."""
    parts = urlsplit(url)
    if not parts.username or parts.password is not None or not credential:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(unquote(parts.username), safe='')}:{quote(credential, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
