"""The portal's side of the host link: which `PortalLink` a host's code gets, and the base of host tasks.

`InProcessLink` is the portal's own machine (`make run`'s host `local`, and tests that run an agent
without a portal URL): it calls the very services the HTTP views call (`compute.host_reports`), with the
same values, so both kinds of host are checked alike. `link_for(host)` picks it or the HTTP client.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from backups.in_process_link import InProcessVolumeCalls  # volumes, snapshots, backups (issue 17)
from compute.host.link import (
    NOT_APPLIED,
    NOT_FOUND,
    HostApiClient,
    HostApiError,
    PortalLink,
    RemoteHeartbeat,
    RemoteProgress,
    wire_changes,
)
from portal.tasks import OperationTask


class InProcessLink(InProcessVolumeCalls):
    """The portal's own machine: the same services the host API's views call, without HTTP."""

    def __init__(self, host: Any) -> None:
        self.host = host

    def _run(self, service: Any, **kwargs: Any) -> Any:
        from compute import host_reports
        from portal.errors import ServiceError

        try:
            return service(actor=host_reports.host_actor(self.host), host=self.host, **kwargs)
        except ServiceError as error:
            raise HostApiError(error.status_code, error.code, error.message) from None

    def heartbeat(self) -> dict[str, Any]:
        from compute import host_reports

        host_reports.record_heartbeat(self.host)
        return {"host": str(self.host.pk), "name": self.host.name}

    def report_facts(self, facts: dict[str, Any]) -> dict[str, Any]:
        from compute import host_reports

        return dict(self._run(host_reports.report_facts, facts=facts))

    def workloads(self) -> list[dict[str, Any]]:
        from compute import host_reports

        return host_reports.desired_set(self.host)

    def workload(self, workload_id: Any) -> dict[str, Any]:
        from compute import host_reports
        from portal.errors import ServiceError

        try:
            return host_reports.workload_spec_on(self.host, workload_id)
        except ServiceError as error:
            raise HostApiError(error.status_code, error.code, error.message) from None

    def report_state(
        self,
        workload_id: Any,
        expected: list[str],
        changes: dict[str, Any],
        *,
        never_started: bool = False,
        count_restart: bool = False,
    ) -> dict[str, Any]:
        from compute import host_reports

        try:
            return dict(
                self._run(
                    host_reports.report_workload_state,
                    workload_id=workload_id,
                    expected=[str(state) for state in expected],
                    changes=wire_changes(changes),
                    never_started=never_started,
                    count_restart=count_restart,
                )
            )
        except HostApiError as error:
            if error.status == NOT_FOUND:
                return dict(NOT_APPLIED)
            raise

    def report_removed(self, workload_id: Any) -> bool:
        from compute import host_reports

        try:
            return bool(self._run(host_reports.report_workload_removed, workload_id=workload_id)["removed"])
        except HostApiError as error:
            if error.status == NOT_FOUND:
                return False
            raise

    def record_samples(self, workloads: dict[str, Any], host_sample: dict[str, Any]) -> int:
        from compute import host_reports

        return int(self._run(host_reports.record_samples, workloads=workloads, host_sample=host_sample))

    def report_network_repairs(
        self, repaired: list[str], repaired_by_compartment: dict[str, list[str]]
    ) -> dict[str, Any]:
        from compute import host_reports

        return dict(
            self._run(
                host_reports.report_network_repairs,
                repaired=repaired,
                repaired_by_compartment=repaired_by_compartment,
            )
        )

    def operation(self, op_id: Any, event: str, **fields: Any) -> dict[str, Any] | None:
        from compute import host_reports

        return self._run(host_reports.report_operation, op_id=op_id, event=event, **fields)  # type: ignore[no-any-return]


_clients: dict[tuple[int, str, str], HostApiClient] = {}
_clients_lock = threading.Lock()


def remote_settings() -> tuple[str, str] | None:
    """(portal URL, credential) when this process is a host on its own (both set), else None."""
    from django.conf import settings

    portal, credential = settings.BULKHEAD_PORTAL_URL, settings.BULKHEAD_HOST_CREDENTIAL
    return (portal, credential) if portal and credential else None


def link_for(host: Any) -> PortalLink:
    """The HTTP client when this agent has a portal URL and its credential; else the in-process link.
    One client per process (a forked worker child makes its own)."""
    remote = remote_settings()
    if remote is None:
        return InProcessLink(host)
    key = (os.getpid(), *remote)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = HostApiClient(*remote)
        return client


class HostOperationTask(OperationTask):
    """An operation on a host's queue. A host on its own machine claims it, reports progress,
    heartbeats and its outcome through the host API (`compute.host_reports.report_operation`: only
    operations queued for that host); on the portal's machine the same `portal.operations` functions
    that service calls are called directly."""

    abstract = True

    def __call__(self, op_id: str, *args: Any, **kwargs: Any) -> Any:
        if remote_settings() is None:
            return super().__call__(op_id, *args, **kwargs)
        with self.held_while_running(op_id):  # as OperationTask does: the lock before the claim
            return self._run_remotely(op_id, *args, **kwargs)

    def _run_remotely(self, op_id: str, *args: Any, **kwargs: Any) -> Any:
        from celery import Task

        from portal.errors import operator_detail, tenant_message
        from portal.failpoints import failpoint
        from portal.models import Operation
        from portal.operations import heartbeat_seconds

        link = link_for(None)
        claimed = link.operation(op_id, "claim")
        if claimed is None:
            return None  # finished or cancelled: nothing to do
        # The row as the portal answered it (never saved here): what the task body reads.
        op = Operation(
            id=claimed["id"],
            kind=claimed["kind"],
            state=claimed["state"],
            target_type=claimed["target_type"],
            target_id=claimed["target_id"] or "",
            params=claimed["params"] or {},
        )
        self.operation = op
        self.progress = RemoteProgress(link, op_id)  # type: ignore[assignment]
        failpoint("operation.claimed")
        try:
            with RemoteHeartbeat(link, op_id, heartbeat_seconds()):
                result = Task.__call__(self, op_id, *args, **kwargs)
        except Exception as exc:
            link.operation(op_id, "fail", error=tenant_message(exc), detail=operator_detail(exc))
            raise
        link.operation(op_id, "finish", result=result if isinstance(result, dict) else None)
        return result
