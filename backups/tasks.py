"""Backup tasks. Thin: on the volume's host queue the work comes through the host link and runs in
`compute.host.backups`; verify and export run on the portal's queue and call backups.services."""

from __future__ import annotations

import contextlib
from typing import Any

from backups import services
from backups.models import Backup
from compute.host import backups as host_backups
from compute.host.tasks import HostOperationTask
from imaging.store import BackupStore
from portal.celery import app
from portal.models import Operation
from portal.tasks import OperationTask
from volumes.tasks import VolumeHostTask, failure_message, run_work


def _op(task: OperationTask, op_id: str) -> Operation:
    op = task.operation
    return op if op is not None and str(op.pk) == str(op_id) else Operation.objects.get(pk=op_id)


def _backup(backup_id: Any) -> Backup | None:
    return (
        Backup.objects.select_related("volume__host", "snapshot", "tenant", "schedule")
        .filter(pk=backup_id)
        .first()
    )


@app.task(base=VolumeHostTask, bind=True, name="backups.run_backup")
def run_backup(self: HostOperationTask, op_id: str) -> dict[str, Any]:
    def do(link: Any, place: Any, work: dict[str, Any], progress: Any) -> dict[str, Any]:
        try:
            return host_backups.run_backup(link, place, host_store(), work, progress)
        except Exception as exc:
            if work.get("backup") is not None:
                with contextlib.suppress(Exception):  # the operation's failure is reported either way
                    link.report_backup(work["backup"]["id"], "fail", message=failure_message(exc))
            raise

    return run_work(self, op_id, do)


@app.task(base=VolumeHostTask, bind=True, name="backups.restore_backup")
def restore_backup(self: HostOperationTask, op_id: str) -> dict[str, Any]:
    def do(link: Any, place: Any, work: dict[str, Any], progress: Any) -> dict[str, Any]:
        return host_backups.restore_backup(link, place, host_store(), work, progress)

    return run_work(self, op_id, do)


def host_store() -> BackupStore:
    """This host's backup store (on the portal's machine, the portal's store itself)."""
    from django.conf import settings

    return BackupStore(settings.BULKHEAD_BACKUP_DIR)


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
