"""Placement: filter hosts by state, capability and free capacity, then spread (most free share first)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Sum

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


def usage_of(host: Host) -> Usage:
    totals = Workload.objects.filter(host=host).aggregate(vcpus=Sum("vcpus"), memory=Sum("memory_mib"))
    return Usage(vcpus=totals["vcpus"] or Decimal(0), memory_mib=totals["memory"] or 0)


def capable(host: Host, isolation: str) -> bool:
    if isolation == Isolation.MICROVM:
        return bool(host.facts.get("libvirt"))
    return bool(host.facts.get("oci_runtimes")) or bool(host.oci_runtime_override)


def choose_host(*, isolation: str, vcpus: Decimal, memory_mib: int, pinned: Host | None = None) -> Host:
    """Pick a host, under row locks on the candidates so concurrent placements see each other."""
    candidates = Host.objects.select_for_update().order_by("name")
    if pinned is not None:
        candidates = candidates.filter(pk=pinned.pk)
    else:
        candidates = candidates.filter(state=HostState.READY, pinned_only=False)
    best: tuple[Decimal, Host] | None = None
    reasons: list[str] = []
    for host in candidates:
        if pinned is None and host.state != HostState.READY:
            continue
        if not capable(host, isolation):
            reasons.append(f"{host.name}: cannot run {isolation}")
            continue
        used = usage_of(host)
        free_vcpus = host.vcpu_capacity - used.vcpus
        free_memory = host.memory_capacity_mib - used.memory_mib
        if vcpus > free_vcpus or memory_mib > free_memory:
            reasons.append(f"{host.name}: {free_vcpus} vCPUs and {free_memory} MiB free")
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
