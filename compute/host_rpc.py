"""Questions the portal asks a host's agent and waits for: a workload's logs, stats and changes.

A host may be another machine: its files (container logs, cgroups, overlay upper directories) are only
readable there. The portal pushes a request on the host's list in Redis and waits on a reply key; the
host's agent loop, which already wakes every half second, blocks on that list instead of sleeping and
answers at once. Requests carry a deadline (a late answer is dropped, not queued behind new ones) and the
agent keeps a short-lived "answering" key, so a portal asking a host whose agent is not running gets a
clear 503 at once instead of waiting out the timeout.

Only server-generated values travel: workload ids and sizes; the agent looks the workload up in the
database and refuses one that is not on its host.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any, cast

import redis
from django.conf import settings

from compute.host.context import HostContext
from compute.host.spec import WorkloadSpec
from compute.models import Host, Workload
from portal.errors import Conflict, ServiceError

log = logging.getLogger(__name__)

ASK_TIMEOUT_SECONDS = 10.0
# The agent refreshes it every loop (0.5 s); three seconds of silence means nobody answers.
ALIVE_TTL_MS = 3000
REPLY_TTL_SECONDS = 30
MAX_TAIL_BYTES = 4 * 1024 * 1024


class HostNotAnswering(ServiceError):
    status_code = 503
    code = "host_not_answering"


def _requests_key(host_id: Any) -> str:
    return f"bulkhead:host:{host_id}:rpc"


def _alive_key(host_id: Any) -> str:
    return f"bulkhead:host:{host_id}:rpc-alive"


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=ASK_TIMEOUT_SECONDS + 5)


def _pop(client: redis.Redis, key: str, timeout: float) -> bytes | None:
    """BLPOP one key with a fractional timeout (Redis >= 6); the value, or None on timeout."""
    item = cast("list[bytes] | None", client.blpop([key], timeout=timeout))  # type: ignore[arg-type]
    return item[1] if item else None


def ask(workload: Workload, query: str, timeout: float = ASK_TIMEOUT_SECONDS, **params: Any) -> Any:
    """Ask the agent of the workload's host ``query`` about it; raise HostNotAnswering or the refusal."""
    host_id = workload.host_id
    if host_id is None:
        raise Conflict("The workload is not placed on a host yet.")
    client = _redis()
    if not client.exists(_alive_key(host_id)):
        raise HostNotAnswering("The workload's host is not answering: is its agent running?")
    request_id = uuid.uuid4().hex
    request = {
        "id": request_id,
        "query": query,
        "workload": str(workload.pk),
        "params": params,
        "deadline": time.time() + timeout,
    }
    pipe = client.pipeline()
    pipe.rpush(_requests_key(host_id), json.dumps(request))
    pipe.expire(_requests_key(host_id), int(timeout) + REPLY_TTL_SECONDS)
    pipe.execute()
    reply = _pop(client, f"bulkhead:rpc:reply:{request_id}", timeout)
    if reply is None:
        raise HostNotAnswering(f"The workload's host did not answer within {timeout:.0f} s.")
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise Conflict(str(answer.get("error") or "The host could not answer."))
    return answer.get("result")


# --- the agent's side ---------------------------------------------------------------------------------


# The agent answers from the workload's spec (served by the portal through its link), never a row.


def _logs(ctx: HostContext, spec: WorkloadSpec, params: dict[str, Any]) -> str:
    from compute.host import agent

    tail = max(0, min(int(params.get("tail_bytes", 64 * 1024)), MAX_TAIL_BYTES))
    return agent.logs(ctx, spec, tail).decode("utf-8", "replace")


def _stats(ctx: HostContext, spec: WorkloadSpec, params: dict[str, Any]) -> dict[str, Any]:
    from compute.host import agent

    return agent.stats(ctx, spec)


def _changes(ctx: HostContext, spec: WorkloadSpec, params: dict[str, Any]) -> list[dict[str, str]]:
    from compute.host import agent

    return agent.changes(ctx, spec, [layer.diff_id for layer in spec.layers])


def _output(ctx: HostContext, spec: WorkloadSpec, params: dict[str, Any]) -> dict[str, Any]:
    from compute.host import agent

    position = params.get("position")
    data, after = agent.output_since(ctx, spec, int(position) if position is not None else None)
    return {"data": base64.b64encode(data).decode("ascii"), "position": after}


QUERIES: dict[str, Callable[[HostContext, WorkloadSpec, dict[str, Any]], Any]] = {
    "logs": _logs,
    "output": _output,
    "stats": _stats,
    "changes": _changes,
}


def serve(host: Host, wait: float) -> int:
    """Say this host answers, then answer the requests that arrive within ``wait`` seconds (at most 20,
    so that the agent loop's other work is never starved); returns how many were answered."""
    client = _redis()
    client.set(_alive_key(host.pk), "1", px=ALIVE_TTL_MS)
    deadline = time.monotonic() + wait
    answered = 0
    while answered < 20:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        item = _pop(client, _requests_key(host.pk), max(0.01, remaining))
        if item is None:
            break
        answered += _answer(client, host, item)
    return answered


def _answer(client: redis.Redis, host: Host, raw: bytes) -> int:
    try:
        request = json.loads(raw)
        request_id = uuid.UUID(str(request["id"])).hex
    except (ValueError, KeyError, TypeError):
        log.warning("dropped a malformed host request")
        return 0
    if float(request.get("deadline", 0)) < time.time():
        return 0  # its asker has given up
    try:
        reply = {"ok": True, "result": _run(host, request)}
    except ServiceError as error:
        reply = {"ok": False, "error": error.message}
    except Exception as error:  # a reply that says why beats a timeout
        log.exception("host request %s failed", request.get("query"))
        reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    key = f"bulkhead:rpc:reply:{request_id}"
    pipe = client.pipeline()
    pipe.rpush(key, json.dumps(reply))
    pipe.expire(key, REPLY_TTL_SECONDS)
    pipe.execute()
    return 1


def _run(host: Host, request: dict[str, Any]) -> Any:
    handler = QUERIES.get(str(request.get("query")))
    if handler is None:
        raise Conflict(f"Unknown host query {request.get('query')!r}.")
    from compute.host.agent import spec_of
    from compute.host.context import host_context

    ctx = host_context(host.pk)
    spec = spec_of(ctx, request.get("workload"))
    if spec is None:
        raise Conflict("No such workload on this host.")
    params = request.get("params")
    return handler(ctx, spec, params if isinstance(params, dict) else {})
