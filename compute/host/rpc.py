"""The host's side of the portal's questions about its workloads (logs, output, stats, changes).

The portal (`compute.host_rpc.ask`) pushes a request on the host's list in Redis, under the host's own key
prefix (`compute.host.broker`): the only keys the host's broker user may touch, so no other host can read
the question, answer it or read the answer. The agent loop blocks on that list between its other work and
answers at once. A request carries everything the answer needs, resolved by the portal: the workload's id,
runtime id, isolation, state and (for changes) its image's layer DiffIDs. The host reads no database row:
it checks the workload is one the portal placed on it (`PlacedWorkloads`, the host API's desired set) and
reads its own runtime files.

Django-free (issue 16's boundary): the queries themselves come from the caller (`WorkloadQueries`).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis

from compute.host.broker import key_prefix

if TYPE_CHECKING:
    from compute.host.console import ConsoleRelays

log = logging.getLogger(__name__)

# The agent refreshes it every loop (0.5 s); three seconds of silence means nobody answers.
ALIVE_TTL_MS = 3000
# An agent that is starting (its re-sync runs before its loop answers) says so for at most this long: the
# portal queues a question for it and waits for the answer instead of a 503 at once.
STARTING_TTL_MS = 60_000
REPLY_TTL_SECONDS = 30
MAX_TAIL_BYTES = 4 * 1024 * 1024
MAX_ANSWERS_PER_WAIT = 20

ISOLATIONS = ("namespace", "microvm")
_RUNTIME_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DIFF_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_LAYERS = 256


def requests_key(host_id: Any) -> str:
    return f"{key_prefix(host_id)}rpc"


def alive_key(host_id: Any) -> str:
    return f"{key_prefix(host_id)}rpc-alive"


def starting_key(host_id: Any) -> str:
    return f"{key_prefix(host_id)}rpc-starting"


def reply_key(host_id: Any, request_id: str) -> str:
    return f"{key_prefix(host_id)}rpc:reply:{request_id}"


class Refused(Exception):
    """The host will not answer this request; the message goes back to the asker."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Target:
    """The workload a question is about, as the portal named it (server-generated values only)."""

    workload_id: str
    runtime_id: str
    isolation: str
    state: str = ""
    diff_ids: tuple[str, ...] = ()

    @classmethod
    def from_wire(cls, value: Any) -> Target:
        """Validated: these values build file paths on the host. Refused if anything is off."""
        if not isinstance(value, dict):
            raise Refused("The request names no workload.")
        try:
            workload_id = str(uuid.UUID(str(value.get("id"))))
        except ValueError:
            raise Refused("The request names no workload.") from None
        runtime_id = str(value.get("runtime_id") or "")
        isolation = str(value.get("isolation") or "")
        diff_ids = value.get("diff_ids") or []
        if (
            not _RUNTIME_ID.match(runtime_id)
            or isolation not in ISOLATIONS
            or not isinstance(diff_ids, list)
            or len(diff_ids) > MAX_LAYERS
            or not all(isinstance(d, str) and _DIFF_ID.match(d) for d in diff_ids)
        ):
            raise Refused("The request names no workload.")
        return cls(workload_id, runtime_id, isolation, str(value.get("state") or "")[:16], tuple(diff_ids))

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Target:
        """From a spec of the host API's desired set (`PortalLink.workloads()`)."""
        layers = (spec.get("image") or {}).get("layers") or []
        return cls.from_wire(
            {
                "id": spec.get("id"),
                "runtime_id": spec.get("runtime_id"),
                "isolation": spec.get("isolation"),
                "state": spec.get("state"),
                "diff_ids": [layer.get("diff_id") for layer in layers][:MAX_LAYERS],
            }
        )

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.workload_id,
            "runtime_id": self.runtime_id,
            "isolation": self.isolation,
            "state": self.state,
            "diff_ids": list(self.diff_ids),
        }


class WorkloadQueries(Protocol):
    """What the host's runtime drivers answer about one workload, named by its runtime id + isolation."""

    def logs(self, target: Target, tail_bytes: int) -> bytes: ...

    def output(self, target: Target, position: int | None) -> tuple[bytes, int]: ...

    def stats(self, target: Target) -> dict[str, Any]: ...

    def changes(self, target: Target) -> list[dict[str, str]]: ...


Handler = Callable[[Target, dict[str, Any]], Any]


def handlers_for(queries: WorkloadQueries, consoles: ConsoleRelays | None = None) -> dict[str, Handler]:
    """The questions a host answers, with their parameters bounded (`console`: with relays to open)."""

    def logs(target: Target, params: dict[str, Any]) -> str:
        tail = max(0, min(int(params.get("tail_bytes", 64 * 1024)), MAX_TAIL_BYTES))
        return queries.logs(target, tail).decode("utf-8", "replace")

    def output(target: Target, params: dict[str, Any]) -> dict[str, Any]:
        position = params.get("position")
        data, after = queries.output(target, int(position) if position is not None else None)
        return {"data": base64.b64encode(data).decode("ascii"), "position": after}

    def stats(target: Target, params: dict[str, Any]) -> dict[str, Any]:
        return queries.stats(target) if target.state == "running" else {}

    def changes(target: Target, params: dict[str, Any]) -> list[dict[str, str]]:
        return queries.changes(target)

    def console(target: Target, params: dict[str, Any]) -> dict[str, Any]:
        if consoles is None or target.isolation != "microvm":
            raise Refused("This workload has no serial console here.")
        return consoles.open(target, str(params.get("session") or ""))

    return {"logs": logs, "output": output, "stats": stats, "changes": changes, "console": console}


class PlacedWorkloads:
    """The workloads the portal placed on this host (the host API's desired set), kept for a while.

    What the agent may answer about: a question naming anything else is refused, whoever pushed it. A
    workload placed since the last look is found by one refresh."""

    def __init__(self, link: Any, max_age: float = 10.0) -> None:
        self.link = link
        self.max_age = max_age
        self._specs: list[dict[str, Any]] = []
        self._fetched = float("-inf")
        self._lock = threading.Lock()

    def specs(self, *, fresh: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            age = time.monotonic() - self._fetched
            # A question about a workload the cached set lacks always looks again: it may have been placed
            # a moment after the last look (only the portal can ask, through the host's own keys).
            if age > self.max_age or fresh:
                self._specs = list(self.link.workloads())
                self._fetched = time.monotonic()
            return list(self._specs)

    def running(self) -> list[dict[str, Any]]:
        return [spec for spec in self.specs() if spec.get("state") == "running"]

    def holds(self, target: Target) -> bool:
        def found(specs: list[dict[str, Any]]) -> bool:
            return any(
                str(spec.get("id")) == target.workload_id
                and spec.get("runtime_id") == target.runtime_id
                and spec.get("isolation") == target.isolation
                for spec in specs
            )

        return found(self.specs()) or found(self.specs(fresh=True))


def pop_one(client: redis.Redis, key: str, timeout: float) -> bytes | None:
    """BLPOP one key with a fractional timeout (Redis >= 6); the value, or None on timeout."""
    item = cast("list[bytes] | None", client.blpop([key], timeout=timeout))  # type: ignore[arg-type]
    return item[1] if item else None


class Answerer:
    """Answers the portal's questions for one host on the host's own broker connection."""

    def __init__(
        self,
        client: redis.Redis,
        host_id: Any,
        handlers: dict[str, Handler],
        is_placed: Callable[[Target], bool],
    ) -> None:
        self.client = client
        self.host_id = str(host_id)
        self.handlers = handlers
        self.is_placed = is_placed
        self._serving = False

    def say_starting(self) -> None:
        """Before the agent's re-sync: questions asked meanwhile wait in the list for the first `serve`."""
        self.client.set(starting_key(self.host_id), "1", px=STARTING_TTL_MS)

    def serve(self, wait: float) -> int:
        """Say this host answers, then answer what arrives within ``wait`` seconds (at most 20, so the
        agent loop's other work is never starved); returns how many were answered."""
        self.client.set(alive_key(self.host_id), "1", px=ALIVE_TTL_MS)
        if not self._serving:
            self.client.delete(starting_key(self.host_id))
            self._serving = True
        deadline = time.monotonic() + wait
        answered = 0
        while answered < MAX_ANSWERS_PER_WAIT:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            item = pop_one(self.client, requests_key(self.host_id), max(0.01, remaining))
            if item is None:
                break
            answered += self.answer(item)
        return answered

    def answer(self, raw: bytes) -> int:
        try:
            request = json.loads(raw)
            request_id = uuid.UUID(str(request["id"])).hex
            late = float(request.get("deadline", 0)) < time.time()
        except (ValueError, KeyError, TypeError):
            log.warning("dropped a malformed host request")
            return 0
        if late:
            return 0  # its asker has given up
        try:
            reply = {"ok": True, "result": self.run(request)}
        except Exception as error:  # a reply that says why beats a timeout
            message = getattr(error, "message", None)
            if not isinstance(message, str):
                log.exception("host request %s failed", request.get("query"))
                message = f"{type(error).__name__}: {error}"
            reply = {"ok": False, "error": message}
        key = reply_key(self.host_id, request_id)
        pipe = self.client.pipeline()
        pipe.rpush(key, json.dumps(reply))
        pipe.expire(key, REPLY_TTL_SECONDS)
        pipe.execute()
        return 1

    def run(self, request: dict[str, Any]) -> Any:
        handler = self.handlers.get(str(request.get("query")))
        if handler is None:
            raise Refused(f"Unknown host query {str(request.get('query'))[:40]!r}.")
        target = Target.from_wire(request.get("target"))
        if not self.is_placed(target):
            raise Refused("No such workload on this host.")
        params = request.get("params")
        return handler(target, params if isinstance(params, dict) else {})
