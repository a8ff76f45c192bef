"""The host's door to the portal: what an agent may say to and ask of it (`PortalLink`).

`HostApiClient` speaks HTTP with the host's own credential (a host on another machine: settings
`BULKHEAD_PORTAL_URL` and `BULKHEAD_HOST_CREDENTIAL`, written by `make agent` at join). The portal's own
machine gets `compute.host_reports.InProcessLink`, which calls the very services the HTTP views call; host
code sees only `PortalLink` and never knows which one it holds.

Which one a process gets is decided once, at start: `register_links` is called by the Django app's
`ready()` (compute/apps.py) with either the in-process factory or `http_links(portal, credential)`;
host code asks `link_to_portal(host_id)` and reads no setting.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from compute.host.periodic import PeriodicThread
from compute.host.volume_link import HostApiVolumeCalls, VolumePortalLink

UPLOAD_CHUNK = 1 << 20
COMMIT_UPLOAD_TIMEOUT = 600.0  # a read of the portal's answer: it hashes (and then unpacks) the layer

# Refusals the agent treats as "that is not (or no longer) mine": the workload was deleted or moved.
NOT_FOUND = 404


class HostApiError(RuntimeError):
    """The portal refused a report (or could not be reached): status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class PortalLink(VolumePortalLink, Protocol):
    """What an agent may say to and ask of the portal (one host, its own things only; volumes,
    snapshots and backups in `VolumePortalLink`)."""

    def heartbeat(self) -> dict[str, Any]: ...

    def host_self(self) -> dict[str, Any]: ...

    def network_state(self) -> dict[str, Any]: ...

    def running_operations(self) -> dict[str, Any]: ...

    def report_facts(self, facts: dict[str, Any]) -> dict[str, Any]: ...

    def workloads(self) -> list[dict[str, Any]]: ...

    def workload(self, workload_id: Any) -> dict[str, Any]: ...

    def report_state(
        self,
        workload_id: Any,
        expected: list[str],
        changes: dict[str, Any],
        *,
        never_started: bool = False,
        count_restart: bool = False,
    ) -> dict[str, Any]: ...

    def report_removed(self, workload_id: Any) -> bool: ...

    def record_samples(self, workloads: dict[str, Any], host_sample: dict[str, Any]) -> int: ...

    def report_network_repairs(
        self, repaired: list[str], repaired_by_compartment: dict[str, list[str]]
    ) -> dict[str, Any]: ...

    def operation(self, op_id: Any, event: str, **fields: Any) -> dict[str, Any] | None: ...

    def upload_commit_layer(
        self, workload_id: Any, op_id: Any, digest: str, size: int, path: Path
    ) -> None: ...

    def report_commit(self, workload_id: Any, op_id: Any, layer: dict[str, Any]) -> dict[str, Any]: ...


def wire_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """A state change as the host API takes it: times are the portal's ("now") or cleared (None)."""
    return {
        name: ("now" if isinstance(value, datetime) else value)
        if name in ("started_at", "finished_at")
        else value
        for name, value in changes.items()
    }


NOT_APPLIED: dict[str, Any] = {"applied": False, "state": None}


def tls_for(portal_url: str, verify: Any) -> Any:
    """The TLS setting of a client of `portal_url`. A portal reached over plain `http://` is never spoken
    to over TLS (no redirect is followed): it gets a context that trusts no certificate at all (any TLS
    connection fails closed), made in microseconds, instead of loading the CA bundle (30-60 ms per
    process, on a worker's first create)."""
    if verify is True and urlsplit(portal_url).scheme == "http":
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checked, certificate required, no roots
    return verify


class HostApiClient(HostApiVolumeCalls):
    """The host API over HTTP(S), authenticated with the host's credential."""

    def __init__(self, portal_url: str, credential: str, *, timeout: float = 30, verify: Any = True) -> None:
        self._portal_root = portal_url.rstrip("/")
        self._client = httpx.Client(
            base_url=portal_url.rstrip("/") + "/api/v1/hosts/self/",
            headers={"Authorization": f"Bearer {credential}"},
            timeout=timeout,
            verify=tls_for(portal_url, verify),
        )

    def close(self) -> None:
        self._client.close()

    def blob(self, repository: str, digest: str) -> AbstractContextManager[httpx.Response]:
        """`GET /v2/<repository>/blobs/<digest>` (the registry, with this host's credential), streamed
        over this client's kept-alive connections (one client per process: its TLS context is made
        once, ~30-60 ms)."""
        return self._client.stream("GET", f"{self._portal_root}/v2/{repository}/blobs/{digest}")

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        try:
            extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
            response = self._client.request(method, path, json=body, **extra)
        except httpx.TransportError as error:
            raise HostApiError(0, "unreachable", f"the portal did not answer: {error}") from None
        if response.status_code >= 400:
            try:
                refusal = response.json().get("error") or {}
            except ValueError:
                refusal = {}
            raise HostApiError(
                response.status_code, str(refusal.get("code", "error")), str(refusal.get("message", ""))[:500]
            )
        return response.json()

    def heartbeat(self) -> dict[str, Any]:
        return dict(self._call("POST", "heartbeat/"))

    def host_self(self) -> dict[str, Any]:
        return dict(self._call("GET", ""))

    def network_state(self) -> dict[str, Any]:
        return dict(self._call("GET", "network/"))

    def running_operations(self) -> dict[str, Any]:
        return dict(self._call("GET", "operations/"))

    def report_facts(self, facts: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "facts/", {"facts": facts}))

    def workloads(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "workloads/")["workloads"])

    def workload(self, workload_id: Any) -> dict[str, Any]:
        return dict(self._call("GET", f"workloads/{workload_id}/"))

    def report_state(
        self,
        workload_id: Any,
        expected: list[str],
        changes: dict[str, Any],
        *,
        never_started: bool = False,
        count_restart: bool = False,
    ) -> dict[str, Any]:
        body = {
            "expected": [str(state) for state in expected],
            "changes": wire_changes(changes),
            "never_started": never_started,
            "count_restart": count_restart,
        }
        try:
            return dict(self._call("POST", f"workloads/{workload_id}/state/", body))
        except HostApiError as error:
            if error.status == NOT_FOUND:
                return dict(NOT_APPLIED)
            raise

    def report_removed(self, workload_id: Any) -> bool:
        try:
            return bool(self._call("POST", f"workloads/{workload_id}/removed/")["removed"])
        except HostApiError as error:
            if error.status == NOT_FOUND:
                return False  # already forgotten
            raise

    def record_samples(self, workloads: dict[str, Any], host_sample: dict[str, Any]) -> int:
        return int(self._call("POST", "samples/", {"workloads": workloads, "host": host_sample})["sampled"])

    def report_network_repairs(
        self, repaired: list[str], repaired_by_compartment: dict[str, list[str]]
    ) -> dict[str, Any]:
        body = {"repaired": repaired, "repaired_by_compartment": repaired_by_compartment}
        return dict(self._call("POST", "network-repairs/", body))

    def operation(self, op_id: Any, event: str, **fields: Any) -> dict[str, Any] | None:
        answer = self._call("POST", f"operations/{op_id}/", {"event": event, **fields})["operation"]
        return dict(answer) if answer is not None else None

    def upload_commit_layer(self, workload_id: Any, op_id: Any, digest: str, size: int, path: Path) -> None:
        """The committed layer's blob, streamed from the store (the portal checks digest and size)."""
        with path.open("rb") as blob:
            self._bytes(
                "PUT",
                f"workloads/{workload_id}/commit/layer/",
                iter(lambda: blob.read(UPLOAD_CHUNK), b""),
                headers={"Content-Length": str(size)},
                timeout=httpx.Timeout(COMMIT_UPLOAD_TIMEOUT, connect=10),
                operation=str(op_id),
                digest=digest,
                size=size,
            )

    def report_commit(self, workload_id: Any, op_id: Any, layer: dict[str, Any]) -> dict[str, Any]:
        # Proving the DiffID means unpacking the layer on the portal: longer than a report.
        body = {"operation": str(op_id), "layer": layer}
        return dict(
            self._call("POST", f"workloads/{workload_id}/commit/", body, timeout=COMMIT_UPLOAD_TIMEOUT)
        )


class RemoteProgress:
    """`operations.Progress` for a host on its own machine: reported through the host API, at most
    every `interval` seconds unless forced or at 100."""

    def __init__(self, link: PortalLink, op_id: Any, interval: float = 0.25) -> None:
        self.link = link
        self.op_id = op_id
        self.interval = interval
        self._last = 0.0

    def __call__(self, percent: float, message: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval and percent < 100:
            return
        self._last = now
        with contextlib.suppress(HostApiError):  # progress is advice: the work goes on
            self.link.operation(self.op_id, "progress", percent=float(percent), message=message[:500])


class RemoteHeartbeat(PeriodicThread):
    """While a host's worker runs an operation, a thread tells the portal it is alive."""

    def __init__(self, link: PortalLink, op_id: Any, seconds: float) -> None:
        super().__init__(f"heartbeat-{op_id}")
        self.link = link
        self.op_id = op_id
        self.seconds = seconds

    def interval(self) -> float:
        return self.seconds

    def tick(self) -> None:
        with contextlib.suppress(HostApiError):  # at worst the portal's sweep calls it lost later
            self.link.operation(self.op_id, "heartbeat")

    def finish(self) -> None:
        # An in-process link opened a database connection for this thread: closed with it.
        thread_done = getattr(self.link, "thread_done", None)
        if thread_done is not None:
            thread_done()


# --- which link this process has ----------------------------------------------------------------

LinkFactory = Callable[[str], PortalLink]
_factory: LinkFactory | None = None
_clients: dict[tuple[int, str, str], HostApiClient] = {}
_clients_lock = threading.Lock()


class NoPortalLink(RuntimeError):
    """Host code ran in a process that was never told how to reach the portal."""


def register_links(factory: LinkFactory) -> None:
    """How this process reaches the portal (called once at start: compute/apps.py)."""
    global _factory
    _factory = factory


def link_to_portal(host_id: Any) -> PortalLink:
    """The link of host `host_id` (a remote host's HTTP client ignores the id: its credential names it)."""
    if _factory is None:
        raise NoPortalLink("no portal link registered in this process")
    return _factory(str(host_id))


def http_links(portal_url: str, credential: str) -> LinkFactory:
    """The factory of a host on its own machine: one HTTP client per process (a forked worker child
    makes its own)."""

    def factory(_host_id: str) -> PortalLink:
        key = (os.getpid(), portal_url, credential)
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = HostApiClient(portal_url, credential)
            return client

    return factory
