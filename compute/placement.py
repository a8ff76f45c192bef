"""Placement: filter hosts by state, capability and free capacity, then spread (most free share first)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db.models import Case, F, IntegerField, Sum, When

from compute.choices import HostState, Isolation
from compute.models import Host, Workload
from portal.errors import ServiceError


class NoHostFits(ServiceError):
    status_code = 409
    code = "no_host_fits"


@dataclass(frozen=True)
class Usage:
    vcpus: Decimal
    memory_mib: int
    disk_gib: int = 0


NO_USAGE = Usage(vcpus=Decimal(0), memory_mib=0)


def host_disk_gib(isolation: str, disk_gib: int) -> int:
    """What a workload can take of its host's disk: its writable disk, and for a micro-VM also the
    export disk its guest writes its changes to (as large as the writable disk plus 64 MiB, writable by
    the guest while it runs), so a host never promises more disk than it has."""
    return disk_gib * 2 + 1 if isolation == Isolation.MICROVM else disk_gib


_HOST_DISK = Case(
    When(isolation=Isolation.MICROVM, then=F("disk_gib") * 2 + 1),
    default=F("disk_gib"),
    output_field=IntegerField(),
)


def usage_by_host(host_ids: Iterable[Any]) -> dict[Any, Usage]:
    """What the workloads placed on each of these hosts take, in one query (hosts without any: absent).

    Callers hold the hosts' row locks first: under READ COMMITTED this statement then sees every
    workload a concurrent placement committed before releasing the lock."""
    rows = (
        Workload.objects.filter(host_id__in=list(host_ids))
        .order_by()
        .values("host_id")
        .annotate(vcpus=Sum("vcpus"), memory=Sum("memory_mib"), disk=Sum(_HOST_DISK))
    )
    return {
        row["host_id"]: Usage(
            vcpus=row["vcpus"] or Decimal(0), memory_mib=row["memory"] or 0, disk_gib=row["disk"] or 0
        )
        for row in rows
    }


def disk_capacity_gib(host: Host) -> int | None:
    """What the host's state filesystem can hold for workload disks (None: the host did not say)."""
    capacity = host.facts.get("disk_gib")
    return int(capacity) if isinstance(capacity, int) and capacity > 0 else None


def usage_of(host: Host) -> Usage:
    return usage_by_host([host.pk]).get(host.pk, NO_USAGE)


def capable(host: Host, isolation: str, networked: bool = False) -> bool:
    """Can run ``isolation``; with ``networked``, also realises compartments (a workload joining one)."""
    if networked:
        from compute.network_services import network_enabled

        if not network_enabled(host):
            return False
    if isolation == Isolation.MICROVM:
        return bool(host.facts.get("libvirt"))
    return bool(host.facts.get("oci_runtimes")) or bool(host.oci_runtime_override)


def choose_host(
    *,
    isolation: str,
    vcpus: Decimal,
    memory_mib: int,
    disk_gib: int = 0,
    pinned: Host | None = None,
    networked: bool = False,
) -> Host:
    """Pick a host, under row locks on the candidates so concurrent placements see each other.

    ``networked``: the workload joins a compartment, so only hosts that realise compartments qualify.
    """
    candidates = Host.objects.select_for_update().order_by("name")
    if pinned is not None:
        candidates = candidates.filter(pk=pinned.pk).exclude(state=HostState.REMOVED)
    else:
        candidates = candidates.filter(state=HostState.READY, pinned_only=False)
    hosts = [  # evaluating the query takes the locks
        host for host in candidates if pinned is not None or host.state == HostState.READY
    ]
    usage = usage_by_host(host.pk for host in hosts if capable(host, isolation, networked)) if hosts else {}
    best: tuple[Decimal, Host] | None = None
    reasons: list[str] = []
    for host in hosts:
        if not capable(host, isolation, networked):
            what = f"{isolation} in a compartment" if networked else isolation
            reasons.append(f"{host.name}: cannot run {what}")
            continue
        used = usage.get(host.pk, NO_USAGE)
        free_vcpus = host.vcpu_capacity - used.vcpus
        free_memory = host.memory_capacity_mib - used.memory_mib
        if vcpus > free_vcpus or memory_mib > free_memory:
            reasons.append(f"{host.name}: {free_vcpus} vCPUs and {free_memory} MiB free")
            continue
        disk_capacity = disk_capacity_gib(host)
        if disk_capacity is not None and host_disk_gib(isolation, disk_gib) > disk_capacity - used.disk_gib:
            reasons.append(f"{host.name}: {disk_capacity - used.disk_gib} GiB of disk free")
            continue
        share = min(
            free_vcpus / host.vcpu_capacity if host.vcpu_capacity else Decimal(0),
            Decimal(free_memory) / host.memory_capacity_mib if host.memory_capacity_mib else Decimal(0),
        )
        if best is None or share > best[0]:
            best = (share, host)
    if best is None:
        detail = "; ".join(reasons) or "no host is ready"
        raise NoHostFits(f"No host can take {vcpus} vCPUs and {memory_mib} MiB of {isolation}: {detail}.")
    return best[1]


def ensure_room(host: Host, *, vcpus: Decimal, memory_mib: int) -> None:
    """Refuse growing a placed workload by (vcpus, memory_mib) beyond its host's free capacity.

    Takes the host's row lock, as ``choose_host`` does, so a concurrent placement sees the growth.
    """
    if vcpus <= 0 and memory_mib <= 0:
        return
    locked = Host.objects.select_for_update().get(pk=host.pk)
    used = usage_of(locked)
    free_vcpus = locked.vcpu_capacity - used.vcpus
    free_memory = locked.memory_capacity_mib - used.memory_mib
    if vcpus > free_vcpus or memory_mib > free_memory:
        raise NoHostFits(
            f"Host {locked.name} has {free_vcpus} vCPUs and {free_memory} MiB free: "
            f"it cannot grow a workload by {max(vcpus, Decimal(0))} vCPUs and {max(memory_mib, 0)} MiB."
        )
