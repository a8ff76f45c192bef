"""The agent's network side (issue 7): realise this host's compartments from the database rows.

`apply_host` builds the host's whole HostNetworkState (every compartment with a member on this host,
every published port of a workload on this host) and converges the host to it with the driver in
compute.network; the driver removes whatever Bulkhead owns that is no longer wanted. Containers join a
named netns that `ensure_container_network` attaches to the compartment's bridge; micro-VMs get a tap
on the same bridge through `vm_network`.

A host's network may live in a namespace (host label `netns`): tests build hosts as namespaces on one
machine. The uplink is the host label `uplink`, else BULKHEAD_UPLINK, else the default route's device.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from compute import network_services
from compute.choices import Isolation, WorkloadState
from compute.compartments import Compartment, IPAllocation, PublishedPort
from compute.host_client import HostOperationTask
from compute.models import Host, Workload
from compute.network import (
    ApplyReport,
    CompartmentNet,
    HostNetworkState,
    PortBinding,
    PortMapping,
    apply_host_network,
    attach_container,
    detach_container,
    dns,
)
from compute.network.names import host_veth_name_for
from compute.network.netns import host_networks, iproute
from compute.runtimes.libvirt import VmNetwork, attach_tap_in_netns, remove_tap_in_netns, tap_name
from portal.celery import app
from portal.models import Operation

log = logging.getLogger(__name__)

AF_INET = 2


@dataclass(frozen=True)
class ContainerNetwork:
    """What a container's spec needs from its compartment."""

    netns_path: str
    ip_address: str
    dns_servers: tuple[str, ...]


def host_netns(host: Host) -> str | None:
    """The named namespace the host's network lives in (None: the machine's own)."""
    name = (host.labels or {}).get("netns")
    return str(name) if name else None


def state_dir(host: Host) -> Path:
    """The network driver's runtime files of `host` (DNS hosts files, the applied record, its lock).

    Under /run, not the data dir: dnsmasq rereads its hosts file as "nobody", which cannot traverse a data
    dir an operator keeps private (0700), and none of this outlives a reboot, as bridges do not."""
    return dns.DEFAULT_STATE_ROOT / f"host-{host.pk.hex}"


def uplink_for(host: Host) -> str:
    """The host label `uplink`, else BULKHEAD_UPLINK, else the device of the default route."""
    explicit = (host.labels or {}).get("uplink") or network_services._setting("BULKHEAD_UPLINK", "")
    if explicit:
        return str(explicit)
    with iproute(host_netns(host)) as ipr:
        for route in ipr.get_routes(family=AF_INET, table=254):
            if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
                link = ipr.get_links(route.get_attr("RTA_OIF"))[0]
                return str(link.get_attr("IFLA_IFNAME"))
    raise ValueError(f"host {host.name} has no default route: set BULKHEAD_UPLINK or the host label uplink")


def netns_name(workload: Workload) -> str:
    """The workload's network namespace: its server-generated runtime id, never user text."""
    return workload.runtime_id


def _underlay(host: Host) -> IPv4Address | None:
    text = (host.labels or {}).get("vxlan_address") or host.address
    try:
        return IPv4Address(str(text)) if text else None
    except ValueError:
        return None


def _live(queryset: Any) -> Any:
    # A workload being deleted leaves the network at once: its name, address and ports go first.
    return queryset.exclude(workload__state=WorkloadState.DELETING)


def compartment_net(compartment: Compartment, host: Host | None = None) -> CompartmentNet:
    """The driver's view of a compartment on `host`: members' names, and VXLAN peers on other hosts."""
    members = _live(IPAllocation.objects.filter(compartment=compartment)).select_related(
        "workload", "workload__host"
    )
    names = {a.workload.name: IPv4Address(a.address) for a in members}
    peers: list[IPv4Address] = []
    if host is not None:
        for other in {a.workload.host for a in members if a.workload.host and a.workload.host_id != host.pk}:
            address = _underlay(other)
            if address is None:
                log.warning(
                    "host %s has no underlay address: compartment %s cannot reach it", other, compartment
                )
            elif address not in peers:
                peers.append(address)
    upstreams = [
        IPv4Address(text.strip())
        for text in network_services._setting("BULKHEAD_COMPARTMENT_DNS_UPSTREAMS", "").split(",")
        if text.strip()
    ]
    return CompartmentNet(
        compartment_id=compartment.network_id,
        bridge=compartment.bridge,
        subnet=compartment.network,
        gateway=compartment.gateway_address,
        nat=compartment.nat,
        vni=compartment.vni if peers else None,
        vxlan_peers=tuple(sorted(peers)),
        dns_names=names,
        dns_upstreams=tuple(upstreams),
        egress_allowed=tuple(network_services.egress_allowed(compartment.tenant_id)),
    )


def workload_port(workload: Workload) -> str:
    """The workload's port on its compartment's bridge: a micro-VM's tap, or a container's host-side veth."""
    if workload.isolation == Isolation.MICROVM:
        return tap_name(workload.pk)
    return host_veth_name_for(netns_name(workload))


def port_bindings(allocations: Any) -> list[PortBinding]:
    """Each workload's port bound to the MAC and address of its primary allocation (the one attached)."""
    bindings: dict[Any, PortBinding] = {}
    for allocation in allocations:
        if allocation.workload_id not in bindings:
            bindings[allocation.workload_id] = PortBinding(
                workload_port(allocation.workload), allocation.mac, IPv4Address(allocation.address)
            )
    return list(bindings.values())


def build_host_state(host: Host) -> HostNetworkState:
    """Everything Bulkhead wants on this host's network, from the rows."""
    allocations = _live(IPAllocation.objects.filter(workload__host=host)).select_related(
        "compartment", "workload"
    )
    compartments = {a.compartment_id: a.compartment for a in allocations}
    nets = [compartment_net(c, host) for c in sorted(compartments.values(), key=lambda c: c.network_id)]
    ports = []
    for port in _live(PublishedPort.objects.filter(host=host)).select_related("workload"):
        allocation = network_services.primary_allocation(port.workload)
        if allocation is None:
            continue
        ports.append(
            PortMapping(port.protocol, port.host_port, IPv4Address(allocation.address), port.workload_port)  # type: ignore[arg-type]
        )
    return HostNetworkState(
        uplink=uplink_for(host),
        compartments=nets,
        ports=ports,
        protected=network_services.protected_networks(),
        bindings=port_bindings(allocations),
    )


@contextmanager
def _host_lock(host: Host) -> Iterator[None]:
    """Build and apply under one lock: a later state must never be overwritten by an older one."""
    directory = state_dir(host)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "agent.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def apply_host(host: Host) -> ApplyReport:
    """Converge the host's network to the rows (idempotent; also repairs outside damage)."""
    netns = host_netns(host)
    with _host_lock(host):
        state = build_host_state(host)
        report = apply_host_network(state, netns, state_dir=state_dir(host))
    if not report.unchanged:
        log.info("network of %s: changed %s repaired %s", host.name, report.changed, report.repaired)
    note_own_networks(host, _own_networks(netns))
    return report


def note_own_networks(host: Host, networks: list[IPv4Network]) -> None:
    """Tell the portal the host's own networks (new subnets keep clear of them), when they changed."""
    from compute.host_client import link_for

    texts = sorted(str(network) for network in networks)[: host_reports_limit()]
    if (host.facts or {}).get("networks") == texts:
        return
    try:
        link_for(host).report_facts({"networks": texts})
    except Exception:  # only advisory: the driver checks again on every apply
        log.exception("could not report the host's networks")


def host_reports_limit() -> int:
    from compute.host_reports import MAX_HOST_NETWORKS

    return MAX_HOST_NETWORKS


def _own_networks(netns: str | None) -> list[IPv4Network]:
    try:
        return host_networks(netns)
    except Exception:  # only advisory: the driver checks again on every apply
        log.exception("could not list the host's networks")
        return []


def ensure_container_network(workload: Workload) -> ContainerNetwork | None:
    """Apply the host's network and attach the workload's namespace; None when it joins no compartment."""
    assert workload.host is not None
    allocation = network_services.primary_allocation(workload)
    if allocation is None or not network_services.network_enabled(workload.host):
        return None
    apply_host(workload.host)
    compartment = allocation.compartment
    path = attach_container(
        compartment_net(compartment),
        netns_name(workload),
        IPv4Address(allocation.address),
        allocation.mac,
        host_netns(workload.host),
    )
    return ContainerNetwork(
        netns_path=path, ip_address=allocation.address, dns_servers=(str(compartment.gateway),)
    )


def vm_network(workload: Workload) -> VmNetwork | None:
    """Apply the host's network and describe the VM's NIC (a tap on the compartment's bridge)."""
    assert workload.host is not None
    allocation = network_services.primary_allocation(workload)
    if allocation is None or not network_services.network_enabled(workload.host):
        return None
    apply_host(workload.host)
    compartment = allocation.compartment
    return VmNetwork(
        mac=allocation.mac,
        bridge=compartment.bridge,
        ipv4_cidr=f"{allocation.address}/{compartment.network.prefixlen}",
        gateway=str(compartment.gateway),
        dns=str(compartment.gateway),
        # A host network in a netns: libvirt's tap is born in the root namespace, attach_vm moves it.
        attach="ethernet" if host_netns(workload.host) else "bridge",
    )


# --- issue 7: micro-VMs on a host whose network lives in a netns ----------------------------------------


def attach_vm(workload: Workload) -> None:
    """After the VM started: move its tap into the host's netns onto its compartment's bridge (idempotent).

    Nothing to do on a host whose network is the root namespace's: libvirt put the tap on the bridge.
    """
    assert workload.host is not None
    netns = host_netns(workload.host)
    allocation = network_services.primary_allocation(workload)
    if netns is None or allocation is None:
        return
    attach_tap_in_netns(workload.pk, allocation.compartment.bridge, netns)


def release_vm(workload: Workload) -> None:
    """After the VM is gone: remove a tap an earlier boot may have left in the host's netns (idempotent)."""
    assert workload.host is not None
    netns = host_netns(workload.host)
    if netns is not None:
        remove_tap_in_netns(workload.pk, netns)


def release(workload: Workload) -> None:
    """After the runtime is gone: remove the container's namespace and re-apply the host without it."""
    assert workload.host is not None
    if not network_services.network_enabled(workload.host):
        return
    detach_container(netns_name(workload), host_netns(workload.host))
    if (
        IPAllocation.objects.filter(workload=workload).exists()
        or PublishedPort.objects.filter(workload=workload).exists()
    ):
        apply_host(workload.host)


@app.task(base=HostOperationTask, bind=True, name="compute.apply_host_network")
def apply_network(self: HostOperationTask, op_id: str) -> dict[str, Any]:
    """Re-apply a host's network after a published port changed (thin: load the host, apply)."""
    op = self.operation if self.operation is not None else Operation.objects.get(pk=op_id)
    host = Host.objects.filter(pk=op.params.get("host")).first()
    if host is None or not network_services.network_enabled(host):
        return {"skipped": "the host does not realise compartments"}
    report = apply_host(host)
    return {"changed": report.changed, "repaired": report.repaired}
