"""Volume tasks on the volume's host queue (`host.<id>`). Thin: load the rows, call volumes.agent."""

from __future__ import annotations

from typing import Any

from portal.celery import app
from portal.errors import tenant_message
from portal.models import Operation
from portal.tasks import OperationTask
from volumes import agent
from volumes.models import Snapshot, Volume


def _op(task: OperationTask, op_id: str) -> Operation:
    op = task.operation
    return op if op is not None and str(op.pk) == str(op_id) else Operation.objects.get(pk=op_id)


def _volume(volume_id: Any) -> Volume | None:
    return Volume.objects.select_related("host", "tenant").filter(pk=volume_id).first()


def _snapshot(snapshot_id: Any) -> Snapshot | None:
    return Snapshot.objects.select_related("volume__host", "volume__tenant").filter(pk=snapshot_id).first()


def _guarded(volume: Volume | None, snap: Snapshot | None, work: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = work()
    except Exception as exc:
        agent.fail(volume, snap, tenant_message(exc))
        raise
    return result


@app.task(base=OperationTask, bind=True, name="volumes.create_volume")
def create_volume(self: OperationTask, op_id: str) -> dict[str, Any]:
    volume = _volume(_op(self, op_id).target_id)
    if volume is None:
        return {"skipped": "volume deleted"}
    return _guarded(volume, None, lambda: agent.create(volume, self.progress))


@app.task(base=OperationTask, bind=True, name="volumes.resize_volume")
def resize_volume(self: OperationTask, op_id: str) -> dict[str, Any]:
    volume = _volume(_op(self, op_id).target_id)
    if volume is None:
        return {"skipped": "volume deleted"}
    return _guarded(volume, None, lambda: agent.resize(volume, self.progress))


@app.task(base=OperationTask, bind=True, name="volumes.delete_volume")
def delete_volume(self: OperationTask, op_id: str) -> dict[str, Any]:
    volume = _volume(_op(self, op_id).target_id)
    if volume is None:
        return {"skipped": "already deleted"}
    return agent.delete(volume, self.progress)


@app.task(base=OperationTask, bind=True, name="volumes.snapshot_volume")
def snapshot_volume(self: OperationTask, op_id: str) -> dict[str, Any]:
    snap = _snapshot(_op(self, op_id).target_id)
    if snap is None:
        return {"skipped": "snapshot deleted"}
    return _guarded(None, snap, lambda: agent.snapshot(snap, self.progress))


@app.task(base=OperationTask, bind=True, name="volumes.restore_snapshot")
def restore_snapshot(self: OperationTask, op_id: str) -> dict[str, Any]:
    snap = _snapshot(_op(self, op_id).target_id)
    if snap is None:
        return {"skipped": "snapshot deleted"}
    return _guarded(snap.volume, None, lambda: agent.restore(snap, self.progress))


@app.task(base=OperationTask, bind=True, name="volumes.clone_snapshot")
def clone_snapshot(self: OperationTask, op_id: str) -> dict[str, Any]:
    op = _op(self, op_id)
    volume = _volume(op.target_id)
    snap = _snapshot(op.params.get("snapshot"))
    if volume is None:
        return {"skipped": "volume deleted"}
    if snap is None:
        agent.fail(volume, None, "The snapshot was deleted before the clone was made.")
        return {"skipped": "snapshot deleted"}
    return _guarded(volume, None, lambda: agent.clone(volume, snap, self.progress))


@app.task(base=OperationTask, bind=True, name="volumes.delete_snapshot")
def delete_snapshot(self: OperationTask, op_id: str) -> dict[str, Any]:
    snap = _snapshot(_op(self, op_id).target_id)
    if snap is None:
        return {"skipped": "already deleted"}
    return agent.delete_snapshot(snap, self.progress)
