"""The host's network (issue 7), realised from the state the portal serves (`GET hosts/self/network/`).

The portal resolves only the compartments with a member on this host, the ports published on it and
what no workload may reach; this module turns that into the driver's `HostNetworkState` and converges
the host to it (compute.network removes whatever Bulkhead owns that is no longer wanted). Containers
join a named netns attached to their compartment's bridge; micro-VMs get a tap on the same bridge.

A host's network may live in a namespace (its profile's `netns`): tests build hosts as namespaces on
one machine. The uplink is the profile's, else the device of the default route.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from compute.host.context import HostContext
from compute.host.spec import MICROVM, NetworkState, ServedBinding, ServedCompartment, WorkloadSpec
from compute.network import (
    ApplyReport,
    CompartmentMissing,
    CompartmentNet,
    HostNetworkState,
    PortBinding,
    PortMapping,
    apply_host_network,
    attach_container,
    detach_container,
    dns,
)
from compute.network.host_state import ensure_compartment_bridge
from compute.network.names import host_veth_name_for
from compute.network.netns import ensure_netns, host_networks, iproute, netns_exists, netns_path
from compute.runtimes.libvirt import VmNetwork, attach_tap_in_netns, remove_tap_in_netns, tap_name

log = logging.getLogger(__name__)

AF_INET = 2
IFF_LOWER_UP = 0x10000  # carrier: a veth has it only while both of its ends are up
MAX_HOST_NETWORKS = 64  # what the portal keeps of a host's own networks (compute.host_reports)


@dataclass(frozen=True)
class ContainerNetwork:
    """What a container's spec needs from its compartment."""

    netns_path: str
    ip_address: str
    dns_servers: tuple[str, ...]


def state_dir(ctx: HostContext) -> Path:
    """The network driver's runtime files of the host (DNS hosts files, the applied record, its lock).

    Under /run, not the data dir: dnsmasq rereads its hosts file as "nobody", which cannot traverse a data
    dir an operator keeps private (0700), and none of this outlives a reboot, as bridges do not."""
    return dns.DEFAULT_STATE_ROOT / f"host-{ctx.profile.id.hex}"


def netns_name(spec: WorkloadSpec) -> str:
    """The workload's network namespace: its server-generated runtime id, never user text."""
    return spec.runtime_id


def uplink_for(ctx: HostContext, served: NetworkState) -> str:
    explicit = served.uplink or ctx.profile.uplink
    if explicit:
        return explicit
    with iproute(ctx.profile.netns) as ipr:
        for route in ipr.get_routes(family=AF_INET, table=254):
            if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
                link = ipr.get_links(route.get_attr("RTA_OIF"))[0]
                return str(link.get_attr("IFLA_IFNAME"))
    raise ValueError(
        f"host {ctx.profile.name} has no default route: set BULKHEAD_UPLINK or the host label uplink"
    )


def compartment_net(compartment: ServedCompartment) -> CompartmentNet:
    return CompartmentNet(
        compartment_id=compartment.compartment_id,
        bridge=compartment.bridge,
        subnet=compartment.subnet,
        gateway=compartment.gateway,
        nat=compartment.nat,
        vni=compartment.vni,
        vxlan_peers=compartment.vxlan_peers,
        dns_names=dict(compartment.dns_names),
        dns_upstreams=compartment.dns_upstreams,
        egress_allowed=compartment.egress_allowed,
    )


def workload_port(binding: ServedBinding) -> str:
    """The workload's port on its compartment's bridge: a micro-VM's tap, or a container's host-side veth."""
    if binding.isolation == MICROVM:
        return tap_name(binding.workload)
    return host_veth_name_for(binding.runtime_id)


def driver_state(ctx: HostContext, served: NetworkState) -> HostNetworkState:
    return HostNetworkState(
        uplink=uplink_for(ctx, served),
        compartments=[compartment_net(c) for c in served.compartments],
        ports=[
            PortMapping(port.protocol, port.host_port, port.address, port.workload_port)  # type: ignore[arg-type]
            for port in served.ports
        ],
        protected=list(served.protected),
        bindings=[PortBinding(workload_port(b), b.mac, b.address) for b in served.bindings],
    )


def _unattached_containers(netns: str | None, served: NetworkState) -> set[IPv4Address]:
    """Addresses of this host's containers whose veth has no carrier yet: nothing answers there.

    attach_container brings the workload's end up last, after its address: carrier on the host's end
    means the address answers ARP. (Micro-VMs are not looked at: their guest configures itself.)
    """
    veths = {host_veth_name_for(b.runtime_id): b.address for b in served.bindings if b.isolation != MICROVM}
    if not veths:
        return set()
    with iproute(netns) as ipr:
        attached = {
            veths[name]
            for link in ipr.get_links()
            if (name := link.get_attr("IFLA_IFNAME")) in veths and link["flags"] & IFF_LOWER_UP
        }
    return set(veths.values()) - attached


def realisable(state: HostNetworkState, served: NetworkState, netns: str | None) -> HostNetworkState:
    """`state` without the published ports of containers not attached yet.

    A port's DNAT to an address that answers nobody yet swallows the client's first SYN (the neighbour
    lookup fails), and the client only sends it again a second later. Without the rule the client is
    refused at once and tries again; the apply that follows the container's attach adds the rule.
    """
    waiting = _unattached_containers(netns, served) if state.ports else set()
    if not waiting:
        return state
    return replace(state, ports=[port for port in state.ports if port.dest_ip not in waiting])


def served_state(ctx: HostContext) -> NetworkState:
    return NetworkState.parse(ctx.link.network_state())


@contextmanager
def _host_lock(ctx: HostContext) -> Iterator[None]:
    """Fetch and apply under one lock: a later state must never be overwritten by an older one."""
    directory = state_dir(ctx)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "agent.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def apply_host(ctx: HostContext) -> tuple[ApplyReport, NetworkState]:
    """Converge the host's network to the portal's state (idempotent; also repairs outside damage)."""
    with _host_lock(ctx):
        served = served_state(ctx)
        report = _apply_served(ctx, served)
    _after_apply(ctx, report)
    return report, served


def _apply_served(ctx: HostContext, served: NetworkState) -> ApplyReport:
    """Apply what the portal served (under the host's lock, with the state fetched under it)."""
    netns = ctx.profile.netns
    state = realisable(driver_state(ctx, served), served, netns)
    return apply_host_network(state, netns, state_dir=state_dir(ctx))


def _after_apply(ctx: HostContext, *reports: ApplyReport) -> None:
    netns = ctx.profile.netns
    for report in reports:
        if not report.unchanged:
            log.info(
                "network of %s: changed %s repaired %s", ctx.profile.name, report.changed, report.repaired
            )
    note_own_networks(ctx, _own_networks(netns))


def note_own_networks(ctx: HostContext, networks: list[IPv4Network]) -> None:
    """Tell the portal the host's own networks (new subnets keep clear of them), when they changed."""
    texts = sorted(str(network) for network in networks)[:MAX_HOST_NETWORKS]
    if list(ctx.profile.networks) == texts:
        return
    try:
        ctx.link.report_facts({"networks": texts})
        ctx.forget_profile()
    except Exception:  # only advisory: the driver checks again on every apply
        log.exception("could not report the host's networks")


def _own_networks(netns: str | None) -> list[IPv4Network]:
    try:
        return host_networks(netns)
    except Exception:  # only advisory: the driver checks again on every apply
        log.exception("could not list the host's networks")
        return []


def _served_compartment(ctx: HostContext, spec: WorkloadSpec) -> ServedCompartment | None:
    """Apply the host's network; the workload's compartment as served (None: it joins none here)."""
    if spec.network is None or not ctx.profile.network_enabled:
        return None
    _report, served = apply_host(ctx)
    compartment = served.compartment(spec.network.compartment)
    if compartment is None:
        raise ValueError("The workload's compartment is not served on its host.")
    return compartment


def _attach_waiting_members(
    ctx: HostContext, served: NetworkState, compartment: ServedCompartment, spec: WorkloadSpec
) -> list[IPv4Address]:
    """Attach the compartment's other containers on this host that are being created: their namespace
    is there (made ahead by their create, see `container_network_ahead`), their veth is not. Their
    create's own network step may come after this one's under the host's lock; meanwhile this container
    may already run and reach them, and a SYN to an address nobody answers for yet is lost (the sender's
    neighbour lookup fails) and sent again only a second later. Attached, an address answers at once
    (refused until its process listens). Returns the addresses attached here."""
    waiting = [
        binding
        for binding in served.bindings
        if binding.isolation != MICROVM
        and binding.runtime_id != spec.runtime_id
        and binding.address in compartment.subnet
    ]
    if not waiting:
        return []
    netns = ctx.profile.netns
    unattached = _unattached_containers(netns, replace(served, bindings=tuple(waiting)))
    attached = []
    for binding in waiting:
        if binding.address in unattached and netns_exists(binding.runtime_id):
            attach_container(
                compartment_net(compartment), binding.runtime_id, binding.address, binding.mac, netns
            )
            attached.append(binding.address)
    return attached


def ensure_container_network(ctx: HostContext, spec: WorkloadSpec) -> ContainerNetwork | None:
    """Apply the host's network and attach the workload's namespace; None when it joins no compartment.

    The attach comes before the apply (the compartment's bridge made alone first when it is missing), so
    that one apply realises the workload's published ports (see `realisable`). All of it under the host's
    lock: a port published meanwhile is either in the state fetched here or applied by its own operation
    after the attach, never left out by an apply that ran between the two. The compartment's members
    being created on this host are attached with it (`_attach_waiting_members`).
    """
    if spec.network is None or not ctx.profile.network_enabled:
        return None
    with _host_lock(ctx):
        served = served_state(ctx)
        compartment = served.compartment(spec.network.compartment)
        if compartment is None:
            raise ValueError("The workload's compartment is not served on its host.")

        def attach() -> str:
            assert spec.network is not None and compartment is not None
            return attach_container(
                compartment_net(compartment),
                netns_name(spec),
                spec.network.address,
                spec.network.mac,
                ctx.profile.netns,
            )

        try:
            path = attach()
        except CompartmentMissing:
            # The bridge alone first: attached before the apply, the workload's ports (and those of the
            # members attached with it) are realised by that one apply, not by a second one.
            ensure_compartment_bridge(
                driver_state(ctx, served),
                compartment.compartment_id,
                ctx.profile.netns,
                state_dir=state_dir(ctx),
            )
            path = attach()
        _attach_waiting_members(ctx, served, compartment, spec)
        reports = [_apply_served(ctx, served)]
    _after_apply(ctx, *reports)
    return ContainerNetwork(
        netns_path=path, ip_address=str(spec.network.address), dns_servers=(str(compartment.gateway),)
    )


def container_network_ahead(ctx: HostContext, spec: WorkloadSpec) -> ContainerNetwork | None:
    """The container's network as `ensure_container_network` will leave it, before it runs: its
    namespace (made here, still empty: the runtime may create the container in it while the network is
    realised), its address and the compartment's gateway as its DNS server. None when the workload joins
    no compartment here, or its spec does not name the gateway (a portal from before it did)."""
    if spec.network is None or spec.network.gateway is None or not ctx.profile.network_enabled:
        return None
    name = netns_name(spec)
    ensure_netns(name)
    return ContainerNetwork(
        netns_path=netns_path(name),
        ip_address=str(spec.network.address),
        dns_servers=(str(spec.network.gateway),),
    )


def vm_network(ctx: HostContext, spec: WorkloadSpec) -> VmNetwork | None:
    """Apply the host's network and describe the VM's NIC (a tap on the compartment's bridge)."""
    compartment = _served_compartment(ctx, spec)
    if compartment is None or spec.network is None:
        return None
    return VmNetwork(
        mac=spec.network.mac,
        bridge=compartment.bridge,
        ipv4_cidr=f"{spec.network.address}/{compartment.subnet.prefixlen}",
        gateway=str(compartment.gateway),
        dns=str(compartment.gateway),
        # A host network in a netns: libvirt's tap is born in the root namespace, attach_vm moves it.
        attach="ethernet" if ctx.profile.netns else "bridge",
    )


def attach_vm(ctx: HostContext, spec: WorkloadSpec) -> None:
    """After the VM started: move its tap into the host's netns onto its compartment's bridge (idempotent).

    Nothing to do on a host whose network is the root namespace's: libvirt put the tap on the bridge.
    """
    netns = ctx.profile.netns
    if netns is None or spec.network is None:
        return
    served = served_state(ctx)
    compartment = served.compartment(spec.network.compartment)
    if compartment is None:
        raise ValueError("The workload's compartment is not served on its host.")
    attach_tap_in_netns(spec.id, compartment.bridge, netns)


def release_vm(ctx: HostContext, spec: WorkloadSpec) -> None:
    """After the VM is gone: remove a tap an earlier boot may have left in the host's netns (idempotent)."""
    netns = ctx.profile.netns
    if netns is not None:
        remove_tap_in_netns(spec.id, netns)


def release(ctx: HostContext, spec: WorkloadSpec) -> None:
    """After the runtime is gone: remove the container's namespace and re-apply the host without it."""
    if not ctx.profile.network_enabled:
        return
    detach_container(netns_name(spec), ctx.profile.netns)
    if spec.network is not None:
        apply_host(ctx)


def remove_host(ctx: HostContext) -> None:
    """Everything Bulkhead made on the host's network (the agent's shutdown with --stop-workloads-on-exit)."""
    import shutil

    from compute.network.host_state import remove_host_network

    directory = state_dir(ctx)
    remove_host_network(ctx.profile.netns, state_dir=directory)
    shutil.rmtree(directory, ignore_errors=True)
