"""The tasks of a host's queue (`host.<id>`): thin, fetch the spec, call the driver, report.

Names are the ones the portal sends (`compute.create_workload`, ...). The base task claims, progresses,
heartbeats and finishes its operation through the host's link (in process on the portal's machine,
the host API elsewhere), like every other report: a host's worker holds no database connection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from celery import Task, shared_task

from compute.host import commit, network, reports
from compute.host import spec as s
from compute.host.agent import spec_of
from compute.host.broker import OPERATION_HEADER, SPEC_HEADER
from compute.host.context import HostContext, host_context
from compute.host.drivers import CreatedAhead, driver_for
from compute.host.link import RemoteHeartbeat, RemoteProgress
from compute.host.locks import workload_lock
from compute.host.spec import WorkloadSpec
from portal.errors import operator_detail, tenant_message
from portal.failpoints import failpoint

log = logging.getLogger(__name__)

HOST_QUEUE_PREFIX = "host."
# Parameters the portal adds to an operation while it runs (`compute.host_reports.receive_commit_layer`).
RUNNING_NOTES = ("layer",)


class _Sent(Enum):
    NOT_SENT = "not sent"


@dataclass(frozen=True)
class ClaimedOperation:
    """The operation as the portal answered the claim (never a row)."""

    id: str
    kind: str
    target_type: str
    target_id: str
    params: dict[str, Any]
    # What the claim carried back for a workload operation (`WorkloadTask.claim_fields`): whether its
    # `creating` report applied, and the workload's spec after it (None: not, or no longer, on this
    # host; NOT_SENT: the claim carried no spec, it is read on its own).
    reported: bool = False
    workload: dict[str, Any] | Literal[_Sent.NOT_SENT] | None = _Sent.NOT_SENT

    @property
    def pk(self) -> str:
        return self.id


class HostOperationTask(Task):  # type: ignore[misc]
    """An operation on a host's queue, claimed and reported through the host's link."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    operation: ClaimedOperation | None = None
    progress: Any

    def host_id(self) -> str:
        """The host whose queue delivered this task (a joined host's agent.env names it too)."""
        delivery = getattr(self.request, "delivery_info", None) or {}
        queue = str(delivery.get("routing_key") or "")
        if queue.startswith(HOST_QUEUE_PREFIX):
            return queue.removeprefix(HOST_QUEUE_PREFIX)
        host_id = os.environ.get("BULKHEAD_HOST_ID", "")
        if not host_id:
            raise RuntimeError("a host task ran outside a host's queue")
        return host_id

    def __call__(self, op_id: str, *args: Any, **kwargs: Any) -> Any:
        ctx = host_context(self.host_id())
        with self.held_while_running(ctx, op_id):
            link = ctx.link
            claimed = self.claim(ctx, op_id)
            if claimed is None:
                return None  # finished or cancelled: nothing to do
            self.operation = ClaimedOperation(
                id=str(claimed["id"]),
                kind=str(claimed["kind"]),
                target_type=str(claimed.get("target_type") or ""),
                target_id=str(claimed.get("target_id") or ""),
                params=dict(claimed.get("params") or {}),
                reported=bool(claimed.get("reported")),
                workload=claimed.get("workload", _Sent.NOT_SENT),
            )
            self.progress = RemoteProgress(link, op_id)
            failpoint("operation.claimed")
            try:
                self.check_claim(self.operation)
                with RemoteHeartbeat(link, op_id, ctx.local.operation_heartbeat_seconds):
                    result = super().__call__(op_id, *args, **kwargs)
            except Exception as exc:
                link.operation(op_id, "fail", error=tenant_message(exc), detail=operator_detail(exc))
                raise
            link.operation(op_id, "finish", result=result if isinstance(result, dict) else None)
            return result

    def held_while_running(self, ctx: HostContext, op_id: str) -> AbstractContextManager[Any]:
        """What the task holds from before its claim until its operation is finished. Nothing here."""
        return nullcontext()

    def claim(self, ctx: HostContext, op_id: str) -> dict[str, Any] | None:
        """The portal's answer to the claim (None: the operation is finished or cancelled)."""
        answer: dict[str, Any] | None = ctx.link.operation(op_id, "claim", **self.claim_fields())
        return answer

    def claim_fields(self) -> dict[str, Any]:
        """What the claim asks besides the operation (see `report_operation`). Nothing here."""
        return {}

    def check_claim(self, claimed: ClaimedOperation) -> None:
        """Refuse to run an operation that is not what the task prepared for. Nothing to check here."""
        return None


class WorkloadTask(HostOperationTask):
    """An operation on one workload, run under the workload's lock on this host from before its claim
    until it is finished: the agent's re-sync, which fails a running operation whose lock is free as
    interrupted, can never catch a live task between its claim and its lock, or between its work and
    its finish."""

    abstract = True
    peeked: dict[str, Any] = {}  # replaced (never mutated) by each run

    @contextmanager
    def held_while_running(self, ctx: HostContext, op_id: str) -> Iterator[None]:
        self.peeked = peeked = self.sent_peek(op_id) or ctx.link.operation(op_id, "peek") or {}
        target = peeked.get("target_id") if peeked.get("target_type") == "workload" else None
        if not target:
            yield
            return
        with workload_lock(ctx, target):
            yield

    def sent_peek(self, op_id: str) -> dict[str, Any] | None:
        """What the portal said the operation is about when it queued it (the message's header), if it
        did: one request less before the claim (`check_claim` holds it to the claim's answer)."""
        sent = getattr(self.request, OPERATION_HEADER, None)
        if isinstance(sent, dict) and str(sent.get("id")) == str(op_id):
            return dict(sent)
        return None

    def check_claim(self, claimed: ClaimedOperation) -> None:
        peeked_target = self.peeked.get("target_id") if self.peeked.get("target_type") == "workload" else None
        claimed_target = claimed.target_id if claimed.target_type == "workload" else None
        # What the portal notes on a running operation (a commit's uploaded layer) is not in a message sent
        # before: a redelivered message (its worker lost) still agrees with its operation.
        claimed_params = {k: v for k, v in claimed.params.items() if k not in RUNNING_NOTES}
        if (peeked_target or None) != (claimed_target or None) or (
            self.peeked.get("params") is not None and dict(self.peeked["params"]) != claimed_params
        ):
            # Only a forged message can say so: the lock held is not the target's. Nothing was run.
            raise RuntimeError("the operation's message does not match the operation")

    def claim_fields(self) -> dict[str, Any]:
        # The spec comes with the claim (read after it, under the workload's lock, as a separate read was).
        return {"spec": True}

    def context(self) -> HostContext:
        return host_context(self.host_id())

    def claimed(self) -> ClaimedOperation:
        assert self.operation is not None
        return self.operation

    def workload(self) -> WorkloadSpec | None:
        """The workload's spec, read under the task's lock (with the claim). None when it is gone."""
        claimed = self.claimed()
        if claimed.workload is _Sent.NOT_SENT:
            return spec_of(self.context(), claimed.target_id)
        return WorkloadSpec.parse(claimed.workload) if claimed.workload is not None else None


class CreateWorkloadTask(WorkloadTask):
    """A create's claim carries the workload's `creating` report too (when it is to start): one request
    claims the operation, marks the workload being created and brings its spec.

    When the message carries the spec too (`SPEC_HEADER`), the driver creates the workload while the
    claim is answered (`create_ahead`: nothing started, nothing reported); the create then only starts
    it, if the claim's spec agrees. Whatever the task did not start is removed before the lock is let go.
    """

    abstract = True
    ahead: CreatedAhead | None = None  # what the driver made ahead of this run's claim

    def claim_fields(self) -> dict[str, Any]:
        fields = super().claim_fields()
        if dict(self.peeked.get("params") or {}).get("start", True):
            fields["report"] = reports.creating_report(first_start=True)
        return fields

    @contextmanager
    def held_while_running(self, ctx: HostContext, op_id: str) -> Iterator[None]:
        self.ahead = None
        with super().held_while_running(ctx, op_id):
            try:
                yield
            finally:
                ahead, self.ahead = self.ahead, None
                if ahead is not None and not ahead.handled:
                    driver_for(ahead.isolation).discard_ahead(ctx, ahead)

    def claim(self, ctx: HostContext, op_id: str) -> dict[str, Any] | None:
        sent = self.sent_spec() if ctx.local.create_ahead else None
        if sent is None:
            return super().claim(ctx, op_id)

        def claim_now() -> dict[str, Any] | None:
            failpoint("create.claiming")  # tests hold the claim back here, to change what it answers
            return super(CreateWorkloadTask, self).claim(ctx, op_id)

        claiming = ctx.aside(f"claim-{op_id}", claim_now)
        try:
            self.ahead = driver_for(sent.isolation).create_ahead(ctx, sent)
        except Exception:
            log.warning("creating %s ahead of its claim failed (created after it)", sent.id, exc_info=True)
        answer = claiming.result()
        failpoint("create.ahead")  # created from the message's spec and claimed; not started
        return answer

    def sent_spec(self) -> WorkloadSpec | None:
        """The spec the message carried, for the workload the message is about (else None)."""
        sent = getattr(self.request, SPEC_HEADER, None)
        if not isinstance(sent, dict) or not dict(self.peeked.get("params") or {}).get("start", True):
            return None
        try:
            spec = WorkloadSpec.parse(sent)
        except s.SpecInvalid:
            return None
        if self.peeked.get("target_type") != "workload" or str(spec.id) != str(self.peeked.get("target_id")):
            return None
        return spec


@shared_task(base=CreateWorkloadTask, bind=True, name="compute.create_workload")
def create_workload(self: CreateWorkloadTask, op_id: str) -> dict[str, Any]:
    spec = self.workload()
    if spec is None:
        return {"skipped": "workload deleted"}
    ctx = self.context()
    if not self.claimed().params.get("start", True):
        reports.transition(ctx, spec, [s.PENDING], state=s.STOPPED)
        return {"state": s.STOPPED}
    driver = driver_for(spec.isolation)
    options: dict[str, Any] = {"ahead": self.ahead} if self.ahead is not None else {}
    state = driver.ensure_running(
        ctx, spec, self.progress, first_start=True, creating_reported=self.claimed().reported, **options
    )
    return {"state": state}


@shared_task(base=WorkloadTask, bind=True, name="compute.start_workload")
def start_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    spec = self.workload()
    if spec is None:
        return {"skipped": "workload deleted"}
    return {"state": driver_for(spec.isolation).ensure_running(self.context(), spec, self.progress)}


@shared_task(base=WorkloadTask, bind=True, name="compute.stop_workload")
def stop_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    spec = self.workload()
    if spec is None:
        return {"skipped": "workload deleted"}
    ctx = self.context()
    driver_for(spec.isolation).stop(ctx, spec, float(self.claimed().params.get("grace_seconds", 10)))
    after = spec_of(ctx, spec.id) or spec
    return {"state": after.state, "exit_code": after.exit_code}


@shared_task(base=WorkloadTask, bind=True, name="compute.restart_workload")
def restart_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    spec = self.workload()
    if spec is None:
        return {"skipped": "workload deleted"}
    ctx = self.context()
    driver = driver_for(spec.isolation)
    self.progress(10, "Stopping", force=True)
    driver.stop(ctx, spec, float(self.claimed().params.get("grace_seconds", 10)))
    after = spec_of(ctx, spec.id)
    if after is None:
        return {"skipped": "workload deleted"}
    return {"state": driver.ensure_running(ctx, after, self.progress)}


@shared_task(base=WorkloadTask, bind=True, name="compute.delete_workload")
def delete_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    spec = self.workload()
    if spec is None:
        return {"skipped": "already deleted"}
    ctx = self.context()
    self.progress(20, "Removing from the host", force=True)
    driver_for(spec.isolation).remove(ctx, spec, float(self.claimed().params.get("grace_seconds", 10)))
    reports.report_removed(ctx, spec)
    return {"deleted": str(spec.id)}


@shared_task(base=WorkloadTask, bind=True, name="compute.move_workload")
def move_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    """On the host a workload leaves: remove it here, then hand it to its new host."""
    spec = self.workload()
    if spec is None:
        return {"skipped": "workload deleted"}
    ctx = self.context()
    self.progress(20, "Removing it from this host", force=True)
    driver_for(spec.isolation).remove(ctx, spec, 10)
    self.progress(70, "Handing it to its new host", force=True)
    # The portal lands it on the target it chose when the move was asked (host API).
    landed = ctx.link.operation(op_id, "moved") or {}
    if landed.get("create_operation") is None:
        return {"landed": False}
    return {"create_operation": landed["create_operation"]}


@shared_task(base=WorkloadTask, bind=True, name="compute.commit_workload")
def commit_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    """Its captured changes as a new image: the layer is made here and uploaded, the portal records it."""
    spec = self.workload()
    if spec is None:
        return {"skipped": "workload deleted"}
    return commit.commit_changes(self.context(), spec, op_id, self.progress)


@shared_task(base=HostOperationTask, bind=True, name="compute.apply_host_network")
def apply_network(self: HostOperationTask, op_id: str) -> dict[str, Any]:
    """Re-apply the host's network after a published port or a compartment changed."""
    ctx = host_context(self.host_id())
    ctx.forget_profile()  # labels may have changed with what asked for this apply
    if not ctx.profile.network_enabled:
        return {"skipped": "the host does not realise compartments"}
    report, _served = network.apply_host(ctx)
    return {"changed": report.changed, "repaired": report.repaired}
