"""The base of every operation task, and the portal's own self-check operation."""

from __future__ import annotations

import logging
import shutil
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery import Task
from django.conf import settings
from django.db import connection

from portal import operations
from portal.celery import app
from portal.errors import operator_detail, tenant_message
from portal.failpoints import failpoint
from portal.models import Operation

log = logging.getLogger(__name__)


class OperationTask(Task):
    """Runs `run(op_id)` for an Operation row: claims it, records success or the error.

    Subclasses (or @app.task(base=OperationTask) functions) receive the op id and a Progress via
    `self.progress`. A task that finds its work already done must simply succeed.
    """

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    progress: operations.Progress
    # The claimed row, as read right after the claim (a task needing its params or target reads it here).
    operation: Operation | None = None

    def __call__(self, op_id: str, *args: Any, **kwargs: Any) -> Any:
        with self.held_while_running(op_id):
            op = operations.claim(op_id)
            if op is None:
                log.info("operation %s is finished or cancelled; nothing to do", op_id)
                return None
            self.operation = op
            self.progress = operations.Progress(op_id, op=op)
            failpoint("operation.claimed")
            try:
                with operations.Heartbeat(op_id):
                    result = super().__call__(op_id, *args, **kwargs)
            except Exception as exc:
                operations.fail(op_id, tenant_message(exc), detail=operator_detail(exc))
                raise
            operations.finish(op_id, result=result if isinstance(result, dict) else None, op=op)
            return result

    def held_while_running(self, op_id: str) -> AbstractContextManager[Any]:
        """What the task holds from before it claims the operation until the operation is finished
        (a workload task: the workload's lock on its host, which the agent's re-sync reads as "a live
        process works on it"). Nothing by default."""
        return nullcontext()


@app.task(base=OperationTask, bind=True, name="portal.selfcheck")
def selfcheck(self: OperationTask, op_id: str) -> dict[str, Any]:
    """Check the parts every operation needs: database, broker and store disk, with progress."""
    op = Operation.objects.get(pk=op_id)
    checks: dict[str, Any] = {}
    self.progress(10, "Checking the database", force=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        checks["database"] = connection.vendor
    self.progress(40, "Checking the broker", force=True)
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        checks["broker"] = "ok"
    self.progress(70, "Checking disk space", force=True)
    usage = shutil.disk_usage(settings.DATA_DIR)
    checks["data_dir_free_bytes"] = usage.free
    steps = int(op.params.get("steps", 0))
    for step in range(steps):
        self.progress(70 + 30 * (step + 1) / (steps + 1), f"Step {step + 1} of {steps}", force=True)
    return checks


@app.task(name="portal.fail_lost_operations", ignore_result=True)
def fail_lost_operations() -> list[str]:
    return operations.fail_lost()


@app.task(name="portal.sync_broker_users", ignore_result=True)
def sync_broker_users() -> dict[str, int]:
    """Each host's Redis ACL user from the credential rows (a restarted Redis has forgotten them), and what
    the broker refused a host into the audit log."""
    from compute.broker_access import audit_broker_denials, sync_broker_users

    return {**sync_broker_users(), "denials": audit_broker_denials()}


app.conf.beat_schedule = {
    **(app.conf.beat_schedule or {}),
    "fail-lost-operations": {"task": "portal.fail_lost_operations", "schedule": 30.0},
    "sync-broker-users": {"task": "portal.sync_broker_users", "schedule": 30.0},
}
