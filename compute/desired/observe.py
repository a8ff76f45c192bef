"""The observed state of a tenant, read from the database, in the planner's shape (``ObservedResource``).

Rows are the truth the agents keep current (a container stopped on the host is recorded as stopped by
the agent loop), so observing is one query per resource kind and never touches a runtime. Workloads
being deleted are left out: they are on their way out, and a create of the same name waits for them;
so are their published ports (the rows cascade with the workload's).

Networks are the tenant's compartments (managed through ``Compartment.managed_revision``/
``managed_spec_hash``); a workload's ``networks`` are the compartments of its IP allocations, in
allocation (interface) order; its image is the reference the document declared
(``managed_image_reference``), so that ``nginx`` and ``nginx:latest`` of the same image are not drift.
Published ports carry their own managed fields: a row re-created by hand is not managed. Volumes carry
theirs too; a volume's ``size_gib`` is its limit and ``backups`` its enabled schedule; a workload's
``volumes`` are its attachments (by volume name, sorted by path).
"""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from compute.choices import WorkloadState
from compute.compartments import Compartment, IPAllocation, PublishedPort
from compute.desired.document import (
    MountSpec,
    backups_field,
    disk_field,
    network_key,
    normalise_vcpus,
    on_host_lost_field,
    port_key,
    secret_env_field,
    volume_key,
    volumes_field,
    workload_key,
)
from compute.desired.planning import ObservedResource, observed_run_state
from compute.models import Workload
from tenants.models import Tenant
from volumes.choices import VolumeState
from volumes.models import GIB, Volume, VolumeAttachment

# Runtime states on the way somewhere: the row's desired_running says where.
_TRANSIENT_STATES = frozenset({WorkloadState.PENDING, WorkloadState.CREATING})


def run_state(workload: Any) -> str | None:
    """The document's run state (running/stopped) a workload is in or on its way to; None if unknown."""
    if workload.state in _TRANSIENT_STATES:
        return "running" if workload.desired_running else "stopped"
    return observed_run_state(workload.state)


def _vcpus(value: Decimal) -> int | float:
    return normalise_vcpus(float(value))


_WORKLOAD_FIELDS = (
    "id",
    "name",
    "image_id",
    "isolation",
    "command",
    "args",
    "env",
    "secret_env",
    "workdir",
    "user",
    "vcpus",
    "memory_mib",
    "disk_gib",
    "restart_policy",
    "on_host_lost",
    "state",
    "desired_running",
    "managed_revision",
    "managed_spec_hash",
    "managed_image_reference",
    "status_message",
)


def workload_spec(
    workload: Any, reference: str, networks: list[str] | None = None, mounts: list[MountSpec] | None = None
) -> dict[str, Any]:
    """A workload (a row or its fields) as the canonical spec the planner compares (empty strings mean
    "the image's")."""
    return {
        "name": workload.name,
        "image": reference,
        "image_id": str(workload.image_id),
        "isolation": workload.isolation,
        "command": list(workload.command) if workload.command is not None else None,
        "args": list(workload.args) if workload.args is not None else None,
        "env": {str(k): str(v) for k, v in sorted((workload.env or {}).items())},
        **secret_env_field(workload.secret_env),
        "workdir": workload.workdir or None,
        "user": workload.user or None,
        "vcpus": _vcpus(workload.vcpus),
        "memory_mib": workload.memory_mib,
        **disk_field(workload.disk_gib),
        "restart": workload.restart_policy,
        **on_host_lost_field(workload.on_host_lost),
        "state": run_state(workload),
        "networks": list(networks or []),
        **volumes_field(mounts or ()),
    }


def network_spec(compartment: Compartment) -> dict[str, Any]:
    """A compartment row as the canonical network spec (the subnet as IPAM stored it)."""
    return {"name": compartment.name, "subnet": compartment.subnet, "nat": compartment.nat}


def image_reference(workload: Workload) -> str:
    """The reference the workload's image was applied with, or ``name:tag`` when no apply made it."""
    return workload.managed_image_reference or f"{workload.image.name}:{workload.image.tag}"


def observed_resources(tenant: Tenant | Any) -> list[ObservedResource]:
    """Every resource of ``tenant``: its networks (compartments), workloads and published ports."""
    tenant_id: Any = getattr(tenant, "pk", tenant)
    observed: list[ObservedResource] = []
    for compartment in Compartment.objects.filter(tenant_id=tenant_id).order_by("name"):
        observed.append(
            ObservedResource(
                kind="network",
                key=network_key(compartment.name),
                spec=network_spec(compartment),
                managed=compartment.managed_revision is not None,
                managed_revision=compartment.managed_revision,
                managed_spec_hash=compartment.managed_spec_hash or None,
                status={"id": str(compartment.pk), "gateway": compartment.gateway},
            )
        )
    networks_of: dict[Any, list[str]] = {}
    allocations = (
        IPAllocation.objects.filter(compartment__tenant_id=tenant_id)
        .order_by("created_at", "id")
        .values_list("workload_id", "compartment__name")
    )
    for workload_id, network_name in allocations:
        networks_of.setdefault(workload_id, []).append(network_name)
    observed.extend(_observed_volumes(tenant_id))
    mounts_of = _mounts_by_workload(tenant_id)
    # Plain rows, not model instances: a thousand-resource tenant is read on every plan and reconcile.
    rows = (
        Workload.objects.filter(tenant_id=tenant_id)
        .exclude(state=WorkloadState.DELETING)
        .order_by("name")
        .values(*_WORKLOAD_FIELDS, "image__name", "image__tag")
    )
    for row in rows:
        workload = SimpleNamespace(**row)
        reference = workload.managed_image_reference or f"{workload.image__name}:{workload.image__tag}"
        observed.append(
            ObservedResource(
                kind="workload",
                key=workload_key(workload.name),
                spec=workload_spec(
                    workload, reference, networks_of.get(workload.id), mounts_of.get(workload.id)
                ),
                managed=workload.managed_revision is not None,
                managed_revision=workload.managed_revision,
                managed_spec_hash=workload.managed_spec_hash or None,
                status={
                    "runtime_state": workload.state,
                    "id": str(workload.id),
                    "message": workload.status_message,
                },
            )
        )
    observed.extend(_observed_ports(tenant_id))
    return observed


def _observed_volumes(tenant_id: Any) -> list[ObservedResource]:
    """The tenant's volumes (not those being deleted), each with its backup schedule if enabled."""
    rows = (
        Volume.objects.filter(tenant_id=tenant_id)
        .exclude(state=VolumeState.DELETING)
        .order_by("name")
        .values(
            "id",
            "name",
            "size_bytes",
            "state",
            "status_message",
            "managed_revision",
            "managed_spec_hash",
            "backup_schedule__every_hours",
            "backup_schedule__keep_last",
            "backup_schedule__enabled",
        )
    )
    observed = []
    for row in rows:
        schedule = (
            (row["backup_schedule__every_hours"], row["backup_schedule__keep_last"])
            if row["backup_schedule__enabled"]
            else None
        )
        observed.append(
            ObservedResource(
                kind="volume",
                key=volume_key(row["name"]),
                spec={"name": row["name"], "size_gib": row["size_bytes"] // GIB, **backups_field(schedule)},
                managed=row["managed_revision"] is not None,
                managed_revision=row["managed_revision"],
                managed_spec_hash=row["managed_spec_hash"] or None,
                status={"id": str(row["id"]), "state": row["state"], "message": row["status_message"]},
            )
        )
    return observed


def _mounts_by_workload(tenant_id: Any) -> dict[Any, list[MountSpec]]:
    mounts: dict[Any, list[MountSpec]] = {}
    attachments = VolumeAttachment.objects.filter(workload__tenant_id=tenant_id).values_list(
        "workload_id", "volume__name", "path", "read_only"
    )
    for workload_id, volume, path, read_only in attachments:
        mounts.setdefault(workload_id, []).append(MountSpec(path=path, volume=volume, read_only=read_only))
    return mounts


def _observed_ports(tenant_id: Any) -> list[ObservedResource]:
    # A workload port may be published more than once by hand (two host ports): one resource per key,
    # the managed row (or the lowest host port) as its spec, the others listed in its status.
    rows: dict[str, list[Any]] = {}
    published = (
        PublishedPort.objects.filter(tenant_id=tenant_id)
        .exclude(workload__state=WorkloadState.DELETING)
        .order_by("host_port", "protocol", "id")
        .values(
            "pk",
            "workload__name",
            "workload_port",
            "protocol",
            "host_port",
            "managed_revision",
            "managed_spec_hash",
        )
    )
    for fields in published:
        row = SimpleNamespace(**fields)
        rows.setdefault(port_key(row.workload__name, row.workload_port, row.protocol), []).append(row)
    observed: list[ObservedResource] = []
    for key in sorted(rows):
        candidates = rows[key]
        chosen = managed_row(candidates)
        observed.append(
            ObservedResource(
                kind="port",
                key=key,
                spec={
                    "workload": chosen.workload__name,
                    "port": chosen.workload_port,
                    "protocol": chosen.protocol,
                    "host_port": chosen.host_port,
                },
                managed=chosen.managed_revision is not None,
                managed_revision=chosen.managed_revision,
                managed_spec_hash=chosen.managed_spec_hash or None,
                status={
                    "id": str(chosen.pk),
                    "host_ports": [r.host_port for r in candidates],
                },
            )
        )
    return observed


def managed_row(rows: list[Any]) -> Any:
    """The row an apply manages among a port's publications (else the first: the lowest host port)."""
    return next((row for row in rows if row.managed_revision is not None), rows[0])


def deleting_workloads(tenant: Tenant | Any) -> set[str]:
    """Names of the tenant's workloads a delete is removing right now."""
    tenant_id: Any = getattr(tenant, "pk", tenant)
    return set(
        Workload.objects.filter(tenant_id=tenant_id, state=WorkloadState.DELETING).values_list(
            "name", flat=True
        )
    )
