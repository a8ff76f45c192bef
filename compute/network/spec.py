"""Plain frozen values that describe what a host's network should look like.

The server builds these from its rows; the host driver validates them again (`validate_host_state`)
before it changes anything, so a bad value is a ValueError and never a half-applied host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from compute.network import ipam
from compute.network.names import (
    BRIDGE_PREFIX,
    HOST_VETH_PREFIX,
    validate_dns_label,
    validate_ifname,
    validate_mac,
    validate_owned_ifname,
)

Protocol = Literal["tcp", "udp"]
PROTOCOLS: frozenset[str] = frozenset({"tcp", "udp"})
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50
MAX_VNI = (1 << 24) - 1
MIN_MTU = 576
MAX_MTU = 9000


@dataclass(frozen=True)
class CompartmentNet:
    """One compartment as realised on one host.

    `dns_names` maps workload names (DNS labels) to their addresses, including members on other hosts
    of a VXLAN compartment. `mtu` None means 1500, or the uplink MTU minus the VXLAN overhead when `vni`
    is set. `dns_upstreams` are resolvers the compartment's dnsmasq forwards other names to (none: only
    the compartment's own names resolve).
    """

    compartment_id: str
    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address
    nat: bool = True
    vni: int | None = None
    vxlan_peers: Sequence[IPv4Address] = ()
    dns_names: Mapping[str, IPv4Address] = field(default_factory=dict)
    mtu: int | None = None
    dns_upstreams: Sequence[IPv4Address] = ()
    egress_allowed: Sequence[IPv4Network] = ()


@dataclass(frozen=True)
class PortMapping:
    """A published port: traffic to any of the host's addresses on `host_port` goes to `dest_ip:dest_port`."""

    protocol: Protocol
    host_port: int
    dest_ip: IPv4Address
    dest_port: int


@dataclass(frozen=True)
class PortBinding:
    """A workload's port on its compartment's bridge (a container's host-side veth or a micro-VM's tap)
    and the only source MAC and IPv4 address frames entering the bridge from it may carry.

    Ports are named by the server (``bhv`` + a hash), so the binding can be applied before the port
    exists: the port is born bound.
    """

    port: str
    mac: str
    address: IPv4Address


@dataclass(frozen=True)
class HostNetworkState:
    """Everything Bulkhead wants on one host's network. Anything Bulkhead owns that is not here is removed.

    `vxlan_local` is the underlay address VXLAN uses; None means the uplink's first IPv4 address.
    `protected` are networks no workload may reach (the operator's infrastructure: portal, database,
    broker, other hosts); link-local ranges are always protected. A compartment's `egress_allowed`
    networks are the operator's exceptions for that compartment's tenant. `bindings` tie every workload
    port to its workload's MAC and address; a workload port without a binding sends nothing.
    """

    uplink: str
    compartments: Sequence[CompartmentNet] = ()
    ports: Sequence[PortMapping] = ()
    vxlan_local: IPv4Address | None = None
    protected: Sequence[IPv4Network] = ()
    bindings: Sequence[PortBinding] = ()


def _validate_port(number: int, what: str) -> None:
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
        raise ValueError(f"{what} must be an integer in 1..65535, got {number!r}")


def validate_compartment(compartment: CompartmentNet) -> None:
    """Raise ValueError unless every field of `compartment` is safe to put on a host."""
    validate_dns_label(compartment.compartment_id)
    validate_owned_ifname(compartment.bridge, BRIDGE_PREFIX)
    ipam.validate_compartment_subnet(compartment.subnet)
    if not isinstance(compartment.gateway, IPv4Address):
        raise ValueError(f"gateway must be an IPv4Address, got {type(compartment.gateway).__name__}")
    if int(compartment.gateway) not in ipam.usable_hosts(compartment.subnet):
        raise ValueError(f"gateway {compartment.gateway} is not a host address of {compartment.subnet}")
    if not isinstance(compartment.nat, bool):
        raise ValueError("nat must be a bool")
    if compartment.vni is not None:
        if isinstance(compartment.vni, bool) or not isinstance(compartment.vni, int):
            raise ValueError(f"vni must be an integer, got {compartment.vni!r}")
        if not 1 <= compartment.vni <= MAX_VNI:
            raise ValueError(f"vni must be in 1..{MAX_VNI}, got {compartment.vni}")
    elif compartment.vxlan_peers:
        raise ValueError("vxlan_peers given without a vni")
    for peer in compartment.vxlan_peers:
        if not isinstance(peer, IPv4Address) or peer.is_multicast or peer.is_unspecified or peer.is_loopback:
            raise ValueError(f"invalid VXLAN peer address: {peer!r}")
    if len(set(compartment.vxlan_peers)) != len(compartment.vxlan_peers):
        raise ValueError("duplicate VXLAN peer")
    for name, address in compartment.dns_names.items():
        validate_dns_label(name)
        ipam.validate_member_address(compartment.subnet, compartment.gateway, address)
    for allowed in compartment.egress_allowed:
        if not isinstance(allowed, IPv4Network):
            raise ValueError(f"egress_allowed entries must be IPv4Networks, got {allowed!r}")
    for upstream in compartment.dns_upstreams:
        if not isinstance(upstream, IPv4Address) or upstream.is_unspecified or upstream.is_multicast:
            raise ValueError(f"invalid DNS upstream: {upstream!r}")
    if compartment.mtu is not None and (
        isinstance(compartment.mtu, bool)
        or not isinstance(compartment.mtu, int)
        or not MIN_MTU <= compartment.mtu <= MAX_MTU
    ):
        raise ValueError(f"mtu must be in {MIN_MTU}..{MAX_MTU}, got {compartment.mtu!r}")


def validate_port_mapping(port: PortMapping, compartments: Iterable[CompartmentNet]) -> None:
    """Raise ValueError unless `port` is well formed and points into one of `compartments`."""
    if port.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be tcp or udp, got {port.protocol!r}")
    _validate_port(port.host_port, "host_port")
    _validate_port(port.dest_port, "dest_port")
    if not isinstance(port.dest_ip, IPv4Address):
        raise ValueError(f"dest_ip must be an IPv4Address, got {type(port.dest_ip).__name__}")
    # A published port may only lead into a compartment: DNAT to anywhere else would be an open relay.
    for compartment in compartments:
        if port.dest_ip in compartment.subnet:
            ipam.validate_member_address(compartment.subnet, compartment.gateway, port.dest_ip)
            return
    raise ValueError(f"published port destination {port.dest_ip} is in no compartment on this host")


def validate_bindings(bindings: Iterable[PortBinding], compartments: Iterable[CompartmentNet]) -> None:
    """Raise ValueError unless each binding names a workload port, a canonical unicast MAC and a member
    address of one of `compartments`, with no port, MAC or address bound twice."""
    compartments = list(compartments)
    seen: set[tuple[str, object]] = set()
    for binding in bindings:
        validate_owned_ifname(binding.port, HOST_VETH_PREFIX)
        if validate_mac(binding.mac) != binding.mac:
            raise ValueError(f"binding MAC must be lower case: {binding.mac!r}")
        if not isinstance(binding.address, IPv4Address):
            raise ValueError(f"binding address must be an IPv4Address, got {binding.address!r}")
        home = next((c for c in compartments if binding.address in c.subnet), None)
        if home is None:
            raise ValueError(f"bound address {binding.address} is in no compartment on this host")
        ipam.validate_member_address(home.subnet, home.gateway, binding.address)
        for key in (("port", binding.port), ("MAC", binding.mac), ("address", binding.address)):
            if key in seen:
                raise ValueError(f"{key[0]} {key[1]} is bound twice")
            seen.add(key)


def validate_host_state(state: HostNetworkState, host_networks: Iterable[IPv4Network] = ()) -> None:
    """Raise ValueError unless the whole state is consistent and safe; checks everything before any change.

    `host_networks` are the host's own networks (addresses and routes not owned by Bulkhead): a
    compartment subnet that overlaps one would hijack the host's traffic.
    """
    validate_ifname(state.uplink)
    if state.uplink.startswith(("bhb", "bhx", "bhv")):
        raise ValueError(f"uplink {state.uplink!r} is a Bulkhead-owned interface")
    if state.vxlan_local is not None and not isinstance(state.vxlan_local, IPv4Address):
        raise ValueError("vxlan_local must be an IPv4Address")
    for network in state.protected:
        if not isinstance(network, IPv4Network):
            raise ValueError(f"protected entries must be IPv4Networks, got {network!r}")
    host_networks = list(host_networks)
    seen_ids: set[str] = set()
    seen_bridges: set[str] = set()
    seen_vnis: set[int] = set()
    subnets: list[IPv4Network] = []
    for compartment in state.compartments:
        validate_compartment(compartment)
        if compartment.compartment_id in seen_ids:
            raise ValueError(f"duplicate compartment id {compartment.compartment_id!r}")
        if compartment.bridge in seen_bridges:
            raise ValueError(f"duplicate bridge name {compartment.bridge!r}")
        if compartment.vni is not None:
            if compartment.vni in seen_vnis:
                raise ValueError(f"duplicate vni {compartment.vni}")
            seen_vnis.add(compartment.vni)
            if state.vxlan_local is not None and state.vxlan_local in compartment.vxlan_peers:
                raise ValueError("a VXLAN peer is this host's own underlay address")
        ipam.check_no_overlap(compartment.subnet, subnets, host_networks)
        seen_ids.add(compartment.compartment_id)
        seen_bridges.add(compartment.bridge)
        subnets.append(compartment.subnet)
    published: set[tuple[str, int]] = set()
    for port in state.ports:
        validate_port_mapping(port, state.compartments)
        key = (port.protocol, port.host_port)
        if key in published:
            raise ValueError(f"port {port.protocol}/{port.host_port} is published twice")
        published.add(key)
    validate_bindings(state.bindings, state.compartments)


def effective_mtu(compartment: CompartmentNet, uplink_mtu: int) -> int:
    """The L2 MTU of a compartment on a host with an uplink of `uplink_mtu`."""
    if compartment.mtu is not None:
        return compartment.mtu
    if compartment.vni is not None:
        return min(1500, uplink_mtu - VXLAN_OVERHEAD)
    return 1500
