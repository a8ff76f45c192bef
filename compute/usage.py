"""A tenant's measured usage (what its running workloads use now), shown beside its quota."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache

from compute import host_rpc
from compute.choices import Isolation, WorkloadState
from compute.models import Workload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasuredUsage:
    running: int
    memory_bytes: int
    # vCPUs busy on average since the previous look (None on the first look: a rate needs two samples).
    vcpus_busy: float | None


def measured_usage(tenant: Any) -> MeasuredUsage:
    """Sum of the cgroup figures of the tenant's running containers; a micro-VM counts its guest RAM."""
    running = list(Workload.objects.filter(tenant=tenant, state=WorkloadState.RUNNING).select_related("host"))
    memory = 0
    cpu_ns = 0
    for workload in running:
        if workload.isolation == Isolation.MICROVM:
            memory += workload.memory_mib * 1024 * 1024
            continue
        try:
            stats = host_rpc.ask(workload, "stats", timeout=2)
        except Exception:  # a container that just exited, or a host that does not answer
            log.debug("no stats for %s", workload.pk, exc_info=True)
            continue
        memory += int(stats.get("memory_bytes", 0))
        cpu_ns += int(stats.get("cpu_usage_ns", 0))
    now = time.monotonic()
    key = f"usage:cpu:{tenant.pk}"
    previous = cache.get(key)
    cache.set(key, (cpu_ns, now, len(running)), timeout=600)
    busy = None
    if previous is not None and previous[2] == len(running) and now > previous[1]:
        busy = max(0.0, (cpu_ns - previous[0]) / 1e9 / (now - previous[1]))
    return MeasuredUsage(running=len(running), memory_bytes=memory, vcpus_busy=busy)
