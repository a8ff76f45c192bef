"""A test's view of a host's runtimes, as its agent sees them (by the host's id, through its context)."""

from __future__ import annotations

from typing import Any

from compute.host.context import host_context
from compute.host.drivers import container, microvm
from compute.runtimes.libvirt import VmRuntime
from compute.runtimes.oci import OciRuntime


def oci_runtime(host: Any) -> OciRuntime:
    return container.oci_runtime(host_context(host.pk))


def vm_runtime(host: Any) -> VmRuntime:
    return microvm.vm_runtime(host_context(host.pk))


def host_network_state(host: Any) -> Any:
    """The network state the host realises, exactly as its agent builds it from what the portal serves."""
    from compute import host_reports
    from compute.host import network
    from compute.host.spec import NetworkState

    ctx = host_context(host.pk)
    return network.driver_state(ctx, NetworkState.parse(host_reports.network_state(host)))


def workload_spec(workload: Any) -> Any:
    """The spec the workload's host receives."""
    from compute import host_reports
    from compute.host.spec import WorkloadSpec

    return WorkloadSpec.parse(host_reports.workload_spec_on(workload.host, workload.pk))
