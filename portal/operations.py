"""Starting and reporting operations. Rows first, then the task on commit (Nautobot's shape)."""

from __future__ import annotations

import time
from typing import Any

from django.db import models, transaction
from django.utils import timezone

from portal import events
from portal.models import Operation, OperationState


def start(
    *,
    kind: str,
    task: Any,
    actor: Any = None,
    tenant: Any = None,
    target: models.Model | None = None,
    queue: str = "default",
    params: dict[str, Any] | None = None,
) -> Operation:
    """Write the Operation row and send `task` (a Celery task) with its id on commit."""
    op = Operation.objects.create(
        kind=kind,
        tenant=tenant,
        target_type=(target._meta.model_name or "") if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        target_label=str(target)[:200] if target is not None else "",
        queue=queue,
        params=params or {},
        actor=getattr(actor, "user", None),
    )
    op_id = str(op.pk)

    def send() -> None:
        try:
            task.apply_async(args=[op_id], task_id=op_id, queue=queue, retry=False)
        except Exception as exc:  # any broker failure: the row says why, the caller goes on
            fail(op_id, f"Could not queue the task: {exc}")
        else:
            events.publish(op.tenant_id, op.as_event())

    transaction.on_commit(send)
    return op


def _publish(op_id: Any) -> None:
    op = Operation.objects.filter(pk=op_id).first()
    if op is not None:
        events.publish(op.tenant_id, op.as_event())


def claim(op_id: Any) -> bool:
    """queued -> running; a repeated delivery of a running op (worker lost) may claim it again."""
    claimed = Operation.objects.filter(
        pk=op_id, state__in=[OperationState.QUEUED, OperationState.RUNNING]
    ).update(state=OperationState.RUNNING, started_at=timezone.now())
    if claimed:
        _publish(op_id)
    return bool(claimed)


def finish(op_id: Any, *, result: dict[str, Any] | None = None, message: str = "Done") -> None:
    Operation.objects.filter(pk=op_id, state=OperationState.RUNNING).update(
        state=OperationState.SUCCEEDED,
        progress=100,
        message=message,
        result=result or {},
        finished_at=timezone.now(),
    )
    _publish(op_id)


def fail(op_id: Any, error: str) -> None:
    Operation.objects.filter(pk=op_id).exclude(state__in=[OperationState.SUCCEEDED]).update(
        state=OperationState.FAILED, error=error[:4000], finished_at=timezone.now()
    )
    _publish(op_id)


def cancel(op: Operation) -> bool:
    """Only a queued operation can be cancelled; a running one finishes its step first."""
    cancelled = Operation.objects.filter(pk=op.pk, state=OperationState.QUEUED).update(
        state=OperationState.CANCELLED, finished_at=timezone.now()
    )
    if cancelled:
        _publish(op.pk)
    return bool(cancelled)


class Progress:
    """Reports percent and message to the row and the event bus, at most every `interval` seconds."""

    def __init__(self, op_id: Any, interval: float = 0.25) -> None:
        self.op_id = op_id
        self.interval = interval
        self._last = 0.0

    def __call__(self, percent: float, message: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval and percent < 100:
            return
        self._last = now
        Operation.objects.filter(pk=self.op_id, state=OperationState.RUNNING).update(
            progress=max(0, min(100, int(percent))), message=message[:500]
        )
        _publish(self.op_id)
