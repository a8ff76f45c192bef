"""Volume tasks on the volume's host queue (`host.<id>`). Thin: ask the portal for the operation's work
(through the host link) and hand it to `compute.host.volumes`; the worker holds the operation's lock on
the host from before its claim to its end (what the agent's resume reads as "alive")."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from compute.host import volumes as host_volumes
from compute.host.backups import BackupUnavailable
from compute.host.context import HostContext, host_context
from compute.host.tasks import HostOperationTask
from portal.celery import app
from portal.errors import tenant_message


class VolumeHostTask(HostOperationTask):
    abstract = True

    def held_while_running(self, ctx: HostContext, op_id: str) -> contextlib.AbstractContextManager[Any]:
        from volumes.agent import operation_locks_dir

        return host_volumes.operation_lock(operation_locks_dir(), op_id)


def failure_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BackupUnavailable) else tenant_message(exc)


def run_work(task: HostOperationTask, op_id: str, do: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Fetch the work, do it; on an error tell the portal its objects failed (then fail the operation)."""
    from volumes.agent import place_for

    host_id = task.host_id()
    link = host_context(host_id).link
    work = link.volume_work(op_id)
    try:
        return do(link, place_for(host_id), work, task.progress)
    except Exception as exc:
        volume, snap = host_volumes.work_objects(work)
        with contextlib.suppress(Exception):  # the operation's failure is reported either way
            host_volumes.fail(link, volume, snap, failure_message(exc))
        raise


def _volume_task(name: str) -> Any:
    @app.task(base=VolumeHostTask, bind=True, name=name)
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
