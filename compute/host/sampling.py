"""The host's side of sampling: measure the running workloads the portal placed here, and the host itself,
and report them through the host API (the portal timestamps and records them: `compute.sampling`).

The running workloads come from the host API's desired set (`PlacedWorkloads.running()`), not from rows.
Django-free (issue 16's boundary).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from compute.host.rpc import Refused, Target

log = logging.getLogger(__name__)


def workload_sample(stats: dict[str, Any], network: dict[str, int] | None) -> dict[str, Any]:
    """The series' figures from an agent's `stats()` answer and the workload's network counters."""
    cpu_ns = stats.get("cpu_usage_ns")
    return {
        "cpu_seconds": cpu_ns / 1e9 if isinstance(cpu_ns, int | float) else None,
        "memory_bytes": stats.get("memory_bytes"),
        "net_rx_bytes": (network or {}).get("rx_bytes", stats.get("net_rx_bytes")),
        "net_tx_bytes": (network or {}).get("tx_bytes", stats.get("net_tx_bytes")),
        "block_read_bytes": stats.get("block_read_bytes"),
        "block_write_bytes": stats.get("block_write_bytes"),
    }


def sample_host(
    link: Any,
    running: list[dict[str, Any]],
    stats_of: Callable[[Target], dict[str, Any]],
    *,
    host_netns: str | None = None,
    network_enabled: bool = False,
) -> int:
    """Measure each running workload (specs) and the host, report them; returns the workloads sampled."""
    targets = []
    for spec in running:
        try:
            targets.append(Target.from_spec(spec))
        except Refused:
            log.warning("a spec of the desired set names no workload: skipped")
    counters = container_network_counters(targets, host_netns) if network_enabled else {}
    samples: dict[str, Any] = {}
    for target in targets:
        try:
            stats = stats_of(target)
        except Exception as error:  # gone between the look and the read: next round
            log.debug("no stats for %s: %s", target.workload_id, error)
            continue
        if stats:
            samples[target.workload_id] = workload_sample(stats, counters.get(target.workload_id))
    link.record_samples(samples, {"cpu_seconds": host_cpu_seconds(), "memory_used_bytes": host_memory_used()})
    return len(samples)


def container_network_counters(targets: list[Target], host_netns: str | None) -> dict[str, dict[str, int]]:
    """rx/tx bytes per container, from the host ends of their veths (one netlink dump for all).

    The host end receives what the container sends: its rx is the container's tx. A container's network
    namespace is named after its runtime id (`compute.network_agent.netns_name`)."""
    from compute.network.names import host_veth_name_for
    from compute.network.netns import iproute

    by_ifname = {
        host_veth_name_for(t.runtime_id): t.workload_id for t in targets if t.isolation == "namespace"
    }
    if not by_ifname:
        return {}
    counters: dict[str, dict[str, int]] = {}
    try:
        with iproute(host_netns) as ipr:
            for link in ipr.get_links():
                workload_id = by_ifname.get(link.get_attr("IFLA_IFNAME"))
                stats = link.get_attr("IFLA_STATS64")
                if workload_id is not None and stats is not None:
                    counters[workload_id] = {"rx_bytes": stats["tx_bytes"], "tx_bytes": stats["rx_bytes"]}
    except OSError as error:
        log.debug("no network counters: %s", error)
    return counters


def host_cpu_seconds() -> float | None:
    """CPU time the whole machine spent busy (all CPUs), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def host_memory_used() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo if line.strip()}
    except (OSError, ValueError, IndexError):
        return None
    return values.get("MemTotal", 0) - values.get("MemAvailable", 0)
