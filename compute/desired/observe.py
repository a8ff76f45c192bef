"""The observed state of a tenant, read from the database, in the planner's shape (``ObservedResource``).

Rows are the truth the agents keep current (a container stopped on the host is recorded as stopped by
the agent loop), so observing is one query per resource kind and never touches a runtime. Workloads
being deleted are left out: they are on their way out, and a create of the same name waits for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from compute.choices import WorkloadState
from compute.desired.document import normalise_vcpus, workload_key
from compute.desired.planning import ObservedResource, observed_run_state
from compute.models import Workload
from tenants.models import Tenant

# Runtime states on the way somewhere: the row's desired_running says where.
_TRANSIENT_STATES = frozenset({WorkloadState.PENDING, WorkloadState.CREATING})


def run_state(workload: Workload) -> str | None:
    """The document's run state (running/stopped) a workload is in or on its way to; None if unknown."""
    if workload.state in _TRANSIENT_STATES:
        return "running" if workload.desired_running else "stopped"
    return observed_run_state(workload.state)


def _vcpus(value: Decimal) -> int | float:
    return normalise_vcpus(float(value))


def workload_spec(workload: Workload, reference: str) -> dict[str, Any]:
    """A workload row as the canonical spec the planner compares (empty strings mean "the image's")."""
    return {
        "name": workload.name,
        "image": reference,
        "image_id": str(workload.image_id),
        "isolation": workload.isolation,
        "command": list(workload.command) if workload.command is not None else None,
        "args": list(workload.args) if workload.args is not None else None,
        "env": {str(k): str(v) for k, v in sorted((workload.env or {}).items())},
        "workdir": workload.workdir or None,
        "user": workload.user or None,
        "vcpus": _vcpus(workload.vcpus),
        "memory_mib": workload.memory_mib,
        "restart": workload.restart_policy,
        "state": run_state(workload),
        "networks": [],
    }


def image_reference(workload: Workload, recorded: Mapping[str, Any]) -> str:
    """The reference the workload's image was applied with, or ``name:tag`` when it was not (or changed)."""
    entry = recorded.get(workload.name)
    if isinstance(entry, Mapping) and entry.get("image_id") == str(workload.image_id):
        return str(entry["reference"])
    return f"{workload.image.name}:{workload.image.tag}"


def observed_resources(
    tenant: Tenant | Any, image_references: Mapping[str, Any] | None = None
) -> list[ObservedResource]:
    """Every resource of ``tenant`` (networks and ports once compartments exist, workloads now)."""
    tenant_id: Any = getattr(tenant, "pk", tenant)
    recorded = image_references or {}
    observed: list[ObservedResource] = []
    workloads = (
        Workload.objects.filter(tenant_id=tenant_id)
        .exclude(state=WorkloadState.DELETING)
        .select_related("image")
        .order_by("name")
    )
    for workload in workloads:
        observed.append(
            ObservedResource(
                kind="workload",
                key=workload_key(workload.name),
                spec=workload_spec(workload, image_reference(workload, recorded)),
                managed=workload.managed_revision is not None,
                managed_revision=workload.managed_revision,
                managed_spec_hash=workload.managed_spec_hash or None,
                status={"runtime_state": workload.state, "id": str(workload.pk)},
            )
        )
    return observed


def deleting_workloads(tenant: Tenant | Any) -> set[str]:
    """Names of the tenant's workloads a delete is removing right now."""
    tenant_id: Any = getattr(tenant, "pk", tenant)
    return set(
        Workload.objects.filter(tenant_id=tenant_id, state=WorkloadState.DELETING).values_list(
            "name", flat=True
        )
    )
