"""Host agent tasks (queue `host.<id>`) and periodic tasks. Thin: load the row, call the agent."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings

from compute import agent, host_client, hosts
from compute.choices import WorkloadState
from compute.models import Workload
from portal.celery import app
from portal.models import Operation
from portal.tasks import OperationTask


class WorkloadTask(host_client.HostOperationTask):
    """An operation on one workload, run under the workload's lock on this host from before its claim
    until it is finished: the agent's re-sync, which fails a running operation whose lock is free as
    interrupted, can never catch a live task between its claim and its lock, or between its work and
    its finish."""

    abstract = True

    @contextmanager
    def held_while_running(self, op_id: str) -> Iterator[None]:
        target_id = Operation.objects.filter(pk=op_id).values_list("target_id", flat=True).first()
        workload = agent.load(target_id) if target_id else None
        if workload is None:
            yield
            return
        with agent.workload_lock(workload):
            yield


@contextmanager
def workload_of(op_id: str, op: Operation | None = None) -> Iterator[tuple[Operation, Workload | None]]:
    """The operation and its workload, read now that the task holds the workload's lock (WorkloadTask).
    The workload is None when it is gone. `op`: the row as the task claimed it (saves reading it again)."""
    if op is None or str(op.pk) != str(op_id):
        op = Operation.objects.get(pk=op_id)
    yield op, agent.load(op.target_id)


@app.task(base=WorkloadTask, bind=True, name="compute.create_workload")
def create_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    with workload_of(op_id, self.operation) as (op, workload):
        if workload is None:
            return {"skipped": "workload deleted"}
        if not op.params.get("start", True):
            agent.transition(workload, [WorkloadState.PENDING], state=WorkloadState.STOPPED)
            return {"state": WorkloadState.STOPPED}
        return {"state": agent.ensure_running(workload, self.progress, first_start=True)}


@app.task(base=WorkloadTask, bind=True, name="compute.start_workload")
def start_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    with workload_of(op_id, self.operation) as (_op, workload):
        if workload is None:
            return {"skipped": "workload deleted"}
        return {"state": agent.ensure_running(workload, self.progress)}


@app.task(base=WorkloadTask, bind=True, name="compute.stop_workload")
def stop_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    with workload_of(op_id, self.operation) as (op, workload):
        if workload is None:
            return {"skipped": "workload deleted"}
        agent.stop(workload, float(op.params.get("grace_seconds", 10)))
        workload.refresh_from_db()
        return {"state": workload.state, "exit_code": workload.exit_code}


@app.task(base=WorkloadTask, bind=True, name="compute.restart_workload")
def restart_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    with workload_of(op_id, self.operation) as (op, workload):
        if workload is None:
            return {"skipped": "workload deleted"}
        self.progress(10, "Stopping", force=True)
        agent.stop(workload, float(op.params.get("grace_seconds", 10)))
        workload.refresh_from_db()
        return {"state": agent.ensure_running(workload, self.progress)}


@app.task(base=WorkloadTask, bind=True, name="compute.delete_workload")
def delete_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    with workload_of(op_id, self.operation) as (op, workload):
        if workload is None:
            return {"skipped": "already deleted"}
        self.progress(20, "Removing from the host", force=True)
        agent.remove(workload, float(op.params.get("grace_seconds", 10)))
        agent.report_removed(workload)
        return {"deleted": str(workload.pk)}


@app.task(base=WorkloadTask, bind=True, name="compute.commit_workload")
def commit_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    from compute import commit

    with workload_of(op_id, self.operation) as (op, workload):
        if workload is None:
            return {"skipped": "workload deleted"}
        image = commit.commit(
            workload,
            name=op.params["name"],
            tag=op.params["tag"],
            actor_user=op.actor,
            progress=self.progress,
        )
        return {"image": str(image.pk)}


@app.task(base=WorkloadTask, bind=True, name="compute.move_workload")
def move_workload(self: WorkloadTask, op_id: str) -> dict[str, Any]:
    """On the host a workload leaves: remove it here, then hand it to its new host."""
    with workload_of(op_id, self.operation) as (op, workload):
        if workload is None:
            return {"skipped": "workload deleted"}
        self.progress(20, "Removing it from this host", force=True)
        agent.remove(workload, grace_seconds=10)
        self.progress(70, "Handing it to its new host", force=True)
        # The portal lands it on the target it chose when the move was asked (host API).
        assert workload.host is not None
        landed = agent.portal_link(workload.host).operation(op.pk, "moved") or {}
        if landed.get("create_operation") is None:
            return {"landed": False}
        return {"create_operation": landed["create_operation"]}


@app.task(base=OperationTask, bind=True, name="compute.evacuate_host")
def evacuate_host(self: OperationTask, op_id: str) -> dict[str, Any]:
    """Move every workload of the host, then follow the moves until each has landed (or failed)."""
    return hosts.run_evacuation(op_id, self.progress)


@app.task(name="compute.reschedule_lost_workloads", ignore_result=True)
def reschedule_lost_workloads() -> list[str]:
    return hosts.reschedule_lost_workloads()


@app.task(name="compute.mark_lost_hosts", ignore_result=True)
def mark_lost_hosts() -> list[str]:
    return hosts.mark_lost_hosts()


@app.task(name="compute.sample_tenants", ignore_result=True, expires=30)
def sample_tenants() -> int:
    from compute import sampling

    return sampling.sample_tenants()


app.conf.beat_schedule = {
    **(app.conf.beat_schedule or {}),
    "mark-lost-hosts": {"task": "compute.mark_lost_hosts", "schedule": 15.0},
    "reschedule-lost-workloads": {"task": "compute.reschedule_lost_workloads", "schedule": 15.0},
    "sample-tenants": {"task": "compute.sample_tenants", "schedule": settings.BULKHEAD_SAMPLE_SECONDS},
}


import compute.desired.tasks  # noqa: E402, F401  (autodiscover imports <app>.tasks only)
