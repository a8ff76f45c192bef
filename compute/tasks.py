"""The portal's compute tasks (evacuation, lost hosts, samples) and the host tasks it sends.

The tasks of a host's queue live with the host code (`compute.host.tasks`, `compute.host.volume_tasks`,
same names as ever, commit among them); this module imports them so that every worker registers them.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

import compute.host.tasks
import compute.host.volume_tasks
from compute import hosts
from portal.celery import app
from portal.tasks import OperationTask


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
