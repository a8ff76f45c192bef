"""The portal's backup tasks: verify and export (on the portal's queue, calling backups.services), the
schedules and GC. The host's (`backups.run_backup`, `backups.restore_backup`) are in
`compute.host.volume_tasks`, registered on this app by compute/tasks.py for `make run`'s local host."""

from __future__ import annotations

from typing import Any

from backups import services
from backups.models import Backup
from portal.celery import app
from portal.models import Operation
from portal.tasks import OperationTask


def _op(task: OperationTask, op_id: str) -> Operation:
    op = task.operation
    return op if op is not None and str(op.pk) == str(op_id) else Operation.objects.get(pk=op_id)


def _backup(backup_id: Any) -> Backup | None:
    return (
        Backup.objects.select_related("volume__host", "snapshot", "tenant", "schedule")
        .filter(pk=backup_id)
        .first()
    )


@app.task(base=OperationTask, bind=True, name="backups.verify_backup")
def verify_backup(self: OperationTask, op_id: str) -> dict[str, Any]:
    backup = _backup(_op(self, op_id).target_id)
    if backup is None:
        return {"skipped": "backup deleted"}
    self.progress(10, "Re-hashing every chunk", force=True)
    report = services.backup_store().verify(backup.manifest)
    services.record_verify(backup.pk, len(report.bad))
    return {"chunks": report.chunks, "bytes": report.bytes, "bad": [d for d, _ in report.bad][:100]}


@app.task(base=OperationTask, bind=True, name="backups.export_backup")
def export_backup(self: OperationTask, op_id: str) -> dict[str, Any]:
    backup = _backup(_op(self, op_id).target_id)
    if backup is None:
        return {"skipped": "backup deleted"}
    path = services.export_path(op_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a rerun after a lost worker starts the file again
    self.progress(10, "Writing the tar.zst", force=True)
    size = services.backup_store().export_tar(backup.manifest, path=path)
    return {"bytes": size, "download": f"/api/v1/backups/{backup.pk}/download/?operation={op_id}"}


@app.task(name="backups.run_due_schedules", ignore_result=True)
def run_due_schedules() -> list[str]:
    return services.run_due_schedules()


@app.task(name="backups.collect_garbage", ignore_result=True)
def collect_garbage() -> Any:
    services.remove_old_exports()
    return services.collect_garbage()


app.conf.beat_schedule = {
    **(app.conf.beat_schedule or {}),
    "backups-run-due-schedules": {"task": "backups.run_due_schedules", "schedule": 300.0},
    "backups-collect-garbage": {"task": "backups.collect_garbage", "schedule": 3600.0},
}
