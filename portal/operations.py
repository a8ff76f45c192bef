"""Starting and reporting operations. Rows first, then the task on commit (Nautobot's shape)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, connections, models, router, transaction
from django.db.models import Q
from django.utils import timezone

from compute.host.broker import OPERATION_HEADER
from compute.host.periodic import PeriodicThread
from portal import events
from portal.errors import operator_detail
from portal.models import Operation, OperationLogEntry, OperationState

log = logging.getLogger(__name__)


def start(
    *,
    kind: str,
    task: Any,
    actor: Any = None,
    tenant: Any = None,
    target: models.Model | None = None,
    queue: str = "default",
    params: dict[str, Any] | None = None,
    sent_with: Callable[[], dict[str, Any]] | None = None,
) -> Operation:
    """Write the Operation row and send `task` (a Celery task) with its id on commit.

    `sent_with`: more message headers, read after the commit (what the worker may act on before its
    claim is answered; the claim's answer still decides).

    BrokerUnavailable (503) when the broker does not answer: raised before any row is written, so the
    caller's transaction rolls back and no workload waits in `creating` for a task never queued.
    """
    ensure_broker_answers()
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
    OperationLogEntry.objects.create(operation=op, event="queued")
    op_id = str(op.pk)

    transaction.on_commit(lambda: send(task, op_id, queue, op=op, sent_with=sent_with))
    return op


def peek_view(op: Operation) -> dict[str, Any]:
    """What an operation is about, before a worker claims it: its target and parameters."""
    return {
        "id": str(op.pk),
        "target_type": op.target_type,
        "target_id": str(op.target_id or "") or None,
        "params": op.params,
    }


def send(
    task: Any,
    op_id: str,
    queue: str,
    *,
    op: Operation | None = None,
    sent_with: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Queue an operation's task (after the commit that recorded it). A host's queue lives under its own
    key prefix (its broker user sees nothing else): every send to a queue goes through here."""
    from compute.broker_access import producer_for_queue

    # What a host's worker would ask first (`peek`: the target it locks before claiming) travels with
    # the message; the claim's answer stays what counts (compute.host.tasks checks they agree).
    headers: dict[str, Any] | None = {OPERATION_HEADER: peek_view(op)} if op is not None else None
    if sent_with is not None and headers is not None:
        try:
            headers.update(sent_with())
        except Exception:  # only a head start is lost: the worker reads everything with its claim
            log.warning("the extra headers of operation %s could not be made", op_id, exc_info=True)
    try:
        with producer_for_queue(queue) as producer:
            task.apply_async(
                args=[op_id], task_id=op_id, queue=queue, retry=False, producer=producer, headers=headers
            )
    except Exception as exc:  # any broker failure: the row says why, the caller goes on
        fail(op_id, "Could not queue the task; try again.", detail=operator_detail(exc))
    else:
        op = op or Operation.objects.filter(pk=op_id).first()  # the caller's row, else as committed
        if op is not None:
            events.publish(op.tenant_id, op.as_event())


_broker_client: Any = None


def ensure_broker_answers() -> None:
    """One PING on the broker's pooled connection (a round trip on loopback); BrokerUnavailable if none."""
    global _broker_client
    import redis

    from portal.celery import app
    from portal.errors import BrokerUnavailable

    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return
    if _broker_client is None or _broker_client.url != url:
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        client.url = url  # type: ignore[attr-defined]
        _broker_client = client
    try:
        _broker_client.ping()
    except redis.exceptions.RedisError as exc:
        log.warning("broker does not answer: %s", exc)
        raise BrokerUnavailable(
            "The message broker (Redis) is not answering, so nothing was started. "
            "Try again in a moment; an operator should check that Redis is running."
        ) from None


def _publish(op_id: Any) -> None:
    op = Operation.objects.filter(pk=op_id).first()
    if op is not None:
        events.publish(op.tenant_id, op.as_event())


def _publish_changed(op_id: Any, op: Operation | None, changes: dict[str, Any] | None) -> None:
    """Publish the row after an update: from `op` with `changes` applied when our conditional update
    succeeded (the row is then exactly that), else as the database has it."""
    if op is None or changes is None:
        _publish(op_id)
        return
    for name, value in changes.items():
        setattr(op, name, value)
    events.publish(op.tenant_id, op.as_event())


def claim(op_id: Any) -> Operation | None:
    """queued -> running; a repeated delivery of a running op (worker lost) may claim it again.

    Returns the claimed row (the task works from it), or None. One statement where the database can
    return updated rows (PostgreSQL, SQLite >= 3.35): a worker's first step costs one round trip.
    """
    now = timezone.now()
    op = _claim_returning(op_id, now)
    if op is None:
        return None
    log_step(op_id, "started", op.progress)
    events.publish(op.tenant_id, op.as_event())
    return op


def log_step(op_id: Any, event: str, progress: int = 0, message: str = "") -> None:
    """Append one entry to the operation's log (its page and `/operations/{id}/log/`)."""
    OperationLogEntry.objects.create(
        operation_id=op_id, event=event, progress=progress, message=message[:500]
    )


def _claim_returning(op_id: Any, now: Any) -> Operation | None:
    meta = Operation._meta
    conn = connections[router.db_for_write(Operation)]
    if not conn.features.can_return_columns_from_insert:  # no UPDATE ... RETURNING either
        claimed = Operation.objects.filter(
            pk=op_id, state__in=[OperationState.QUEUED, OperationState.RUNNING]
        ).update(state=OperationState.RUNNING, started_at=now, heartbeat_at=now)
        return Operation.objects.filter(pk=op_id).first() if claimed else None

    def field(name: str) -> models.Field[Any, Any]:
        found = meta.get_field(name)
        assert isinstance(found, models.Field)
        return found

    def column(name: str) -> str:
        return str(conn.ops.quote_name(field(name).column))

    def value(name: str, raw: Any) -> Any:
        return field(name).get_db_prep_value(raw, conn)

    # Only the model's own table and column names are formatted in; every value is a parameter.
    sql = (
        f"UPDATE {conn.ops.quote_name(meta.db_table)} "  # noqa: S608
        f"SET {column('state')} = %s, {column('started_at')} = %s, {column('heartbeat_at')} = %s "
        f"WHERE {column('id')} = %s AND {column('state')} IN (%s, %s) RETURNING *"
    )
    params = [
        value("state", OperationState.RUNNING),
        value("started_at", now),
        value("heartbeat_at", now),
        value("id", op_id),
        value("state", OperationState.QUEUED),
        value("state", OperationState.RUNNING),
    ]
    return next(iter(Operation.objects.db_manager(conn.alias).raw(sql, params)), None)


def finish(
    op_id: Any,
    *,
    result: dict[str, Any] | None = None,
    message: str = "Done",
    op: Operation | None = None,
) -> None:
    """running -> succeeded. `op`: the claimed row, if the caller has it (no re-reading for the event).

    A result's ``OPERATOR_ONLY`` entry goes to ``operator_details``, which tenants never read."""
    result = dict(result or {})
    operator_only = result.pop(OPERATOR_ONLY, None)
    changes: dict[str, Any] = {
        "state": OperationState.SUCCEEDED,
        "progress": 100,
        "message": message,
        "result": result,
        "finished_at": timezone.now(),
    }
    if operator_only:
        changes["operator_details"] = operator_only
    finished = Operation.objects.filter(pk=op_id, state=OperationState.RUNNING).update(**changes)
    if finished:
        log_step(op_id, "succeeded", 100, message)
    _publish_changed(op_id, op, changes if finished else None)


# The key of a task's result whose value only operators see (Operation.operator_details).
OPERATOR_ONLY = "operator_only"


def fail(op_id: Any, error: str, *, detail: str = "") -> None:
    """-> failed. `error` is what the tenant reads; `detail`, if any, what only operators read."""
    changes: dict[str, Any] = {
        "state": OperationState.FAILED,
        "error": error[:4000],
        "finished_at": timezone.now(),
    }
    if detail:
        changes["operator_details"] = {"error": detail[:8000]}
    failed = (
        Operation.objects.filter(pk=op_id).exclude(state__in=[OperationState.SUCCEEDED]).update(**changes)
    )
    if failed:
        log_step(op_id, "failed")
    _publish(op_id)


def cancel(op: Operation) -> bool:
    """Only a queued operation can be cancelled; a running one finishes its step first."""
    cancelled = Operation.objects.filter(pk=op.pk, state=OperationState.QUEUED).update(
        state=OperationState.CANCELLED, finished_at=timezone.now()
    )
    if cancelled:
        log_step(op.pk, "cancelled")
        _publish(op.pk)
    return bool(cancelled)


class Progress:
    """Reports percent and message to the row and the event bus, at most every `interval` seconds.

    The first report is written at once, later ones only `interval` after the last written one (or when
    forced, or at 100): a step of a few milliseconds costs no write. `op`: the claimed row, which saves
    re-reading it for each event.
    """

    def __init__(self, op_id: Any, interval: float = 0.25, op: Operation | None = None) -> None:
        self.op_id = op_id
        self.interval = interval
        self.op = op
        self._last = 0.0
        self._logged_message = ""

    def __call__(self, percent: float, message: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval and percent < 100:
            return
        self._last = now
        progress = max(0, min(100, int(percent)))
        changes: dict[str, Any] = {"progress": progress, "message": message[:500]}
        updated = Operation.objects.filter(pk=self.op_id, state=OperationState.RUNNING).update(**changes)
        # The log keeps each new step, not every percent: a long copy is one entry, not a thousand.
        if updated and message and message != self._logged_message:
            self._logged_message = message
            log_step(self.op_id, "progress", progress, message)
        _publish_changed(self.op_id, self.op, changes if updated else None)


def heartbeat_seconds() -> float:
    """How often a running operation's worker says it is alive (``BULKHEAD_OPERATION_HEARTBEAT_SECONDS``)."""
    return float(getattr(settings, "BULKHEAD_OPERATION_HEARTBEAT_SECONDS", 15))


class Heartbeat(PeriodicThread):
    """While a worker runs an operation, a thread renews its ``heartbeat_at`` every few seconds."""

    def __init__(self, op_id: Any) -> None:
        super().__init__(f"heartbeat-{op_id}")
        self.op_id = op_id

    def interval(self) -> float:
        return heartbeat_seconds()

    def tick(self) -> None:
        # A failure ends the beats; the operation goes on and at worst the sweep calls it lost later.
        running = Operation.objects.filter(pk=self.op_id, state=OperationState.RUNNING)
        running.update(heartbeat_at=timezone.now())

    def finish(self) -> None:
        connection.close()


# Operations the sweep leaves alone: host tasks are settled by their agent's re-sync (a host may be
# down for a while and its tasks wait in its queue); desired-state applies by their own lease sweep.
SWEEP_EXCLUDED_KINDS = ("desired.apply",)


def fail_lost(now: Any = None) -> list[str]:
    """Mark failed the running operations of the portal's own workers whose heartbeat stopped.

    A worker killed mid-task leaves its operation ``running`` for good (the broker redelivers only after
    its visibility timeout, an hour): after four missed heartbeats it is failed with a clear message,
    audited, and published, so the user sees it and can start it again.
    """
    from tenants import audit
    from tenants.actors import Actor

    now = now or timezone.now()
    stale = now - timedelta(seconds=4 * heartbeat_seconds())
    lost = (
        Operation.objects.filter(state=OperationState.RUNNING, queue="default")
        .exclude(kind__in=SWEEP_EXCLUDED_KINDS)
        .filter(Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True, started_at__lt=stale))
    )
    failed = []
    for op in lost:
        with transaction.atomic():
            marked = Operation.objects.filter(pk=op.pk, state=OperationState.RUNNING).update(
                state=OperationState.FAILED, error=LOST_WORKER, finished_at=now
            )
            if marked:
                release_reserved_quota(op.pk)  # e.g. image storage a killed pull had reserved
        if marked:
            log_step(op.pk, "failed")
            audit.record(
                Actor.system("portal"), "operation.lost", op, tenant=op.tenant, details={"kind": op.kind}
            )
            _publish(op.pk)
            failed.append(str(op.pk))
    return failed


LOST_WORKER = "The worker running this operation stopped before it finished; start it again."


# --- quota an operation reserved before doing its work (imports and pulls: image_bytes) -----------
# Kept on the operation's row, changed in the transaction that charges or gives back the quota, so that
# exactly one of: the operation's success (settle), its failure (release) or the lost sweep gives it back.

RESERVED_QUOTA = "reserved_quota"


def set_reserved_quota(op_id: Any, amounts: dict[str, int]) -> None:
    """Record what the caller just charged to the tenant's quota for this operation (same transaction)."""
    op = Operation.objects.select_for_update().get(pk=op_id)
    Operation.objects.filter(pk=op_id).update(params={**op.params, RESERVED_QUOTA: amounts})


def settle_reserved_quota(op_id: Any) -> dict[str, int]:
    """Take the reservation off the operation and return it: the caller charges the real amounts."""
    op = Operation.objects.select_for_update().get(pk=op_id)
    amounts = dict(op.params.get(RESERVED_QUOTA) or {})
    if amounts:
        params = {k: v for k, v in op.params.items() if k != RESERVED_QUOTA}
        Operation.objects.filter(pk=op_id).update(params=params)
    return amounts


def release_reserved_quota(op_id: Any) -> None:
    """Give the operation's reservation back to its tenant (nothing if it was settled or released)."""
    from tenants import quota

    amounts = settle_reserved_quota(op_id)
    op = Operation.objects.select_related("tenant").get(pk=op_id)
    if amounts and op.tenant is not None:
        quota.release(op.tenant, **amounts)
