"""Questions the portal asks a host's agent and waits for: a workload's logs, output, stats and changes.

A host may be another machine: its files (container logs, cgroups, overlay upper directories) are only
readable there. The portal pushes a request on the host's list in Redis and waits on a reply key, both
under the host's own key prefix (the only keys its broker user may touch, `compute.broker_access`); the
host's agent loop answers (`compute.host.rpc`). Requests carry a deadline (a late answer is dropped, not
queued behind new ones) and the agent keeps a short-lived "answering" key, so a portal asking a host whose
agent is not running gets a clear 503 at once instead of waiting out the timeout; an agent that is
starting (its re-sync before the loop answers) keeps a "starting" key, and a question asked then waits.

Only server-generated values travel, resolved here so that the host reads no database row: the
workload's id, runtime id, isolation and state, and for changes its image's layer DiffIDs.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from functools import cache
from typing import Any

import redis
from django.conf import settings

from compute.host.rpc import Target, alive_key, pop_one, reply_key, requests_key, starting_key
from compute.models import Workload
from portal.errors import Conflict, ServiceError

log = logging.getLogger(__name__)

ASK_TIMEOUT_SECONDS = 10.0
REPLY_TTL_SECONDS = 30


class HostNotAnswering(ServiceError):
    status_code = 503
    code = "host_not_answering"


class HostAnswerInvalid(ServiceError):
    """The host answered something that is not an answer to the question (audited: only a broken or
    compromised agent does): no page or API answer takes it on trust."""

    status_code = 502
    code = "host_answer_invalid"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**63


def _output(value: Any) -> bool:
    import base64
    import binascii

    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        return False
    position = value.get("position")
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        return False
    try:
        base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


# The shape of each answer the portal's pages, API and consoles use (a question not listed: any JSON).
# NaN and infinities fail `_number` (JSON's parser accepts them; no API answer can carry them).
ANSWER_SHAPES: dict[str, Any] = {
    "logs": lambda value: isinstance(value, str),
    "stats": lambda value: isinstance(value, dict) and all(_number(v) for v in value.values()),
    "changes": lambda value: (
        isinstance(value, list)
        and all(
            isinstance(change, dict)
            and change.get("kind") in ("A", "C", "D")
            and isinstance(change.get("path"), str)
            for change in value
        )
    ),
    "output": _output,
}


def _answer_of(workload: Workload, query: str, reply: bytes) -> Any:
    """The result in the host's reply, if it is one; its refusal as a Conflict (its message bounded)."""
    try:
        answer = json.loads(reply)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and answer.get("ok") is False and isinstance(answer.get("error", ""), str):
        raise Conflict(str(answer.get("error") or "The host could not answer.")[:1000])
    shape = ANSWER_SHAPES.get(query)
    if (
        not isinstance(answer, dict)
        or answer.get("ok") is not True
        or (shape is not None and not shape(answer.get("result")))
    ):
        from tenants import audit
        from tenants.actors import Actor

        host_name = workload.host.name if workload.host is not None else str(workload.host_id)
        audit.record_denied(
            Actor.system(f"host {host_name}"),
            "host.rpc.answer",
            host=host_name,
            query=query,
            workload=str(workload.pk),
        )
        error = HostAnswerInvalid("The workload's host gave an answer that is not one.")
        error.audited = True
        raise error
    return answer.get("result")


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=ASK_TIMEOUT_SECONDS + 5)


def is_answering(host_id: Any) -> bool:
    """Whether the host's agent said within the last seconds that it answers."""
    return bool(_redis().exists(alive_key(host_id)))


def forget_answering(host_id: Any) -> None:
    _redis().delete(alive_key(host_id))


def target_of(workload: Workload, query: str) -> Target:
    """What the host needs to know about the workload to answer ``query`` (no row read on the host)."""
    diff_ids: tuple[str, ...] = ()
    if query == "changes":
        from imaging.models import ImageLayer

        diff_ids = tuple(
            ImageLayer.objects.filter(image_id=workload.image_id)
            .order_by("position")
            .values_list("layer__diff_id", flat=True)
        )
    return Target(
        workload_id=str(workload.pk),
        runtime_id=workload.runtime_id,
        isolation=workload.isolation,
        state=workload.state,
        diff_ids=diff_ids,
    )


def ask(workload: Workload, query: str, timeout: float = ASK_TIMEOUT_SECONDS, **params: Any) -> Any:
    """Ask the agent of the workload's host ``query`` about it; raise HostNotAnswering or the refusal."""
    host_id = workload.host_id
    if host_id is None:
        raise Conflict("The workload is not placed on a host yet.")
    client = _redis()
    # An agent in its re-sync at start answers once its loop runs: its question waits in the list.
    if not client.exists(alive_key(host_id), starting_key(host_id)):
        raise HostNotAnswering("The workload's host is not answering: is its agent running?")
    request_id = uuid.uuid4().hex
    request = {
        "id": request_id,
        "query": query,
        "target": target_of(workload, query).wire(),
        "params": params,
        "deadline": time.time() + timeout,
    }
    pipe = client.pipeline()
    pipe.rpush(requests_key(host_id), json.dumps(request))
    pipe.expire(requests_key(host_id), int(timeout) + REPLY_TTL_SECONDS)
    pipe.execute()
    reply = pop_one(client, reply_key(host_id, request_id), timeout)
    if reply is None:
        raise HostNotAnswering(f"The workload's host did not answer within {timeout:.0f} s.")
    return _answer_of(workload, query, reply)


class HostConsole:
    """The portal's end of a micro-VM console relayed by its host's agent (`compute.host.console`)."""

    def __init__(self, workload: Workload) -> None:
        from compute.host import console

        assert workload.host_id is not None
        self.workload = workload
        self.session = uuid.uuid4().hex
        self.alive = console.session_key(workload.host_id, self.session)
        self.inbox = console.input_key(workload.host_id, self.session)
        self.outbox = console.output_key(workload.host_id, self.session)
        self._refreshed = 0.0

    def open(self) -> None:
        """Ask the host to relay the console; raises HostNotAnswering or its refusal."""
        from compute.host.console import SESSION_TTL_MS

        _redis().set(self.alive, "1", px=SESSION_TTL_MS)
        self._refreshed = time.monotonic()
        ask(self.workload, "console", timeout=5, session=self.session)

    def recv(self, timeout: float) -> bytes | None:
        """Output within ``timeout`` seconds (b"" if none), None once the console ended."""
        from compute.host.console import DATA, SESSION_TTL_MS

        client = _redis()
        if time.monotonic() - self._refreshed > 1.0:
            client.set(self.alive, "1", px=SESSION_TTL_MS)
            self._refreshed = time.monotonic()
        item = pop_one(client, self.outbox, timeout)
        if item is None:
            return b""
        return item[1:] if item[:1] == DATA else None

    def send(self, data: bytes) -> None:
        pipe = _redis().pipeline()
        pipe.rpush(self.inbox, data[:4096])
        pipe.expire(self.inbox, REPLY_TTL_SECONDS)
        pipe.execute()

    def close(self) -> None:
        """The relay notices within half a second and closes the libvirt stream."""
        _redis().delete(self.alive, self.outbox)
