"""Volume, snapshot and backup tasks on the volume's host queue (`host.<id>`), by the names the portal
sends (`volumes.create_volume`, ..., `backups.run_backup`, `backups.restore_backup`).

Thin: ask the portal for the operation's work (through the host link) and hand it to
`compute.host.volumes` / `compute.host.backups`, with the pool where this host's own configuration puts it
(`compute.host.mounts.host_place`). The worker holds the operation's lock on the host from before its
claim to its end (what the agent's resume reads as "alive"). Verify, export, schedules and GC are the
portal's (backups/tasks.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from celery import shared_task

from compute.host import backups as host_backups
from compute.host import volumes as host_volumes
from compute.host.backups import BackupUnavailable
from compute.host.context import HostContext, host_context
from compute.host.mounts import host_place
from compute.host.tasks import HostOperationTask
from imaging.store import BackupStore
from portal.errors import tenant_message


class VolumeHostTask(HostOperationTask):
    abstract = True

    def held_while_running(self, ctx: HostContext, op_id: str) -> contextlib.AbstractContextManager[Any]:
        return host_volumes.operation_lock(ctx.local.operation_locks_dir, op_id)


def failure_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BackupUnavailable) else tenant_message(exc)


def run_work(task: HostOperationTask, op_id: str, do: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Fetch the work, do it; on an error tell the portal its objects failed (then fail the operation)."""
    ctx = host_context(task.host_id())
    link = ctx.link
    work = link.volume_work(op_id)
    try:
        return do(link, host_place(ctx), work, task.progress)
    except Exception as exc:
        volume, snap = host_volumes.work_objects(work)
        with contextlib.suppress(Exception):  # the operation's failure is reported either way
            host_volumes.fail(link, volume, snap, failure_message(exc))
        raise


def _volume_task(name: str) -> Any:
    @shared_task(base=VolumeHostTask, bind=True, name=name)
    def run(self: HostOperationTask, op_id: str) -> dict[str, Any]:
        return run_work(self, op_id, host_volumes.run)

    return run


create_volume = _volume_task("volumes.create_volume")
resize_volume = _volume_task("volumes.resize_volume")
delete_volume = _volume_task("volumes.delete_volume")
snapshot_volume = _volume_task("volumes.snapshot_volume")
restore_snapshot = _volume_task("volumes.restore_snapshot")
clone_snapshot = _volume_task("volumes.clone_snapshot")
delete_snapshot = _volume_task("volumes.delete_snapshot")


@shared_task(base=VolumeHostTask, bind=True, name="backups.run_backup")
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


@shared_task(base=VolumeHostTask, bind=True, name="backups.restore_backup")
def restore_backup(self: HostOperationTask, op_id: str) -> dict[str, Any]:
    def do(link: Any, place: Any, work: dict[str, Any], progress: Any) -> dict[str, Any]:
        return host_backups.restore_backup(link, place, host_store(), work, progress)

    return run_work(self, op_id, do)


def host_store() -> BackupStore:
    """This host's backup store (on the portal's machine, the portal's store itself)."""
    from compute.host.config import local

    return BackupStore(local().backup_store_dir)
