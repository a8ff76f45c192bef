"""Desired-state tasks: apply a stored plan (an operation) and the reconciler's beat tick and runs."""

from __future__ import annotations

from typing import Any

from compute.desired import reconciler, services
from portal.celery import app
from portal.models import Operation
from portal.tasks import OperationTask


@app.task(base=OperationTask, bind=True, name="desired.apply_plan")
def apply_plan(self: OperationTask, op_id: str) -> dict[str, Any]:
    op = Operation.objects.get(pk=op_id)
    return services.execute_plan(op.params["plan"], actor_user=op.actor, progress=self.progress)


@app.task(name="desired.reconcile_tenant", ignore_result=True, acks_late=True)
def reconcile_tenant(tenant_id: str) -> dict[str, Any]:
    return reconciler.reconcile_tenant(tenant_id)


@app.task(name="desired.reconcile_due", ignore_result=True)
def reconcile_due() -> list[str]:
    """The beat tick: send again applies whose worker was lost, and queue one run for each tenant whose
    run is due (jitter is in next_run_at)."""
    services.resume_interrupted_applies()
    picked = [str(tenant_id) for tenant_id in reconciler.due_tenants()]
    for tenant_id in picked:
        reconcile_tenant.apply_async(args=(tenant_id,), queue="default")
    return picked


# Ticks several times per interval: a run is due at most one interval after the previous one.
app.conf.beat_schedule = {
    **(app.conf.beat_schedule or {}),
    "desired-reconcile": {
        "task": "desired.reconcile_due",
        "schedule": max(1.0, reconciler.interval_seconds() / 6),
    },
}
