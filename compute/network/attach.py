"""Namespace containers on a compartment: a named netns joined to the bridge by a veth pair.

The OCI runtime later joins the prepared namespace by path (``linux.namespaces[network].path``). The
host end of the veth lives in the host namespace (`host_netns`) and is a port of the compartment's
bridge; the other end is ``eth0`` inside the workload namespace. Micro-VMs attach differently: libvirt
puts a tap on the same bridge, with a MAC from `names.mac_for`.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from compute.network import ipam
from compute.network.bridge import IFF_UP, delete_link, enable_hairpin, link_by_name
from compute.network.names import (
    BRIDGE_PREFIX,
    CONTAINER_IFNAME,
    host_veth_name_for,
    validate_mac,
    validate_netns_name,
    validate_owned_ifname,
)
from compute.network.netns import delete_netns, ensure_netns, iproute, netns_path
from compute.network.spec import CompartmentNet

AF_INET = 2
EEXIST = 17


class CompartmentMissing(RuntimeError):
    """The compartment's bridge is not on this host: apply the host network state first."""


def _workload_side_ready(
    ipr: IPRoute, compartment: CompartmentNet, ip: IPv4Address, mac: str, mtu: int
) -> bool:
    link = link_by_name(ipr, CONTAINER_IFNAME)
    if link is None or link.get_attr("IFLA_ADDRESS") != mac or link.get_attr("IFLA_MTU") != mtu:
        return False
    if not link["flags"] & IFF_UP:
        return False
    addresses = {
        (a.get_attr("IFA_LOCAL"), a["prefixlen"]) for a in ipr.get_addr(family=AF_INET, index=link["index"])
    }
    if addresses != {(str(ip), compartment.subnet.prefixlen)}:
        return False
    gateways = {r.get_attr("RTA_GATEWAY") for r in ipr.get_routes(family=AF_INET, table=254, dst_len=0)}
    return str(compartment.gateway) in gateways


def _configure_workload_side(
    ipr: IPRoute, compartment: CompartmentNet, ip: IPv4Address, mac: str, mtu: int
) -> None:
    loopback = link_by_name(ipr, "lo")
    if loopback is not None and not loopback["flags"] & IFF_UP:
        ipr.link("set", index=loopback["index"], state="up")
    link = link_by_name(ipr, CONTAINER_IFNAME)
    assert link is not None
    index = link["index"]
    ipr.link("set", index=index, address=mac, mtu=mtu)
    ipr.addr(
        "add",
        index=index,
        address=str(ip),
        prefixlen=compartment.subnet.prefixlen,
        broadcast=str(compartment.subnet.broadcast_address),
    )
    ipr.link("set", index=index, state="up")
    try:
        ipr.route("add", dst="0.0.0.0/0", gateway=str(compartment.gateway), oif=index)
    except NetlinkError as error:
        if error.code != EEXIST:
            raise
        ipr.route("replace", dst="0.0.0.0/0", gateway=str(compartment.gateway), oif=index)


def attach_container(
    compartment: CompartmentNet,
    netns_name: str,
    ip: IPv4Address,
    mac: str,
    host_netns: str | None = None,
) -> str:
    """Connect workload namespace `netns_name` (created if missing) to the compartment's bridge.

    The workload gets `ip` and `mac` on ``eth0``, the bridge's MTU, a default route via the gateway and
    loopback up. Idempotent: a correct attachment is left alone, a broken one is rebuilt. Returns the
    namespace path for the OCI runtime.
    """
    validate_netns_name(netns_name)
    validate_owned_ifname(compartment.bridge, BRIDGE_PREFIX)
    ipam.validate_member_address(compartment.subnet, compartment.gateway, ip)
    mac = validate_mac(mac)
    host_ifname = host_veth_name_for(netns_name)
    with iproute(host_netns) as host:
        bridge = link_by_name(host, compartment.bridge)
        if bridge is None:
            raise CompartmentMissing(f"bridge {compartment.bridge} is not on this host")
        mtu = bridge.get_attr("IFLA_MTU")
        ensure_netns(netns_name)
        host_end = link_by_name(host, host_ifname)
        with iproute(netns_name) as workload:
            if (
                host_end is not None
                and host_end.get_attr("IFLA_MASTER") == bridge["index"]
                and host_end["flags"] & IFF_UP
                and _workload_side_ready(workload, compartment, ip, mac, mtu)
            ):
                return netns_path(netns_name)
            # Anything half-built is rebuilt from scratch: deleting one end of a veth deletes both.
            if host_end is not None:
                host.link("del", index=host_end["index"])
            stale = link_by_name(workload, CONTAINER_IFNAME)
            if stale is not None:
                workload.link("del", index=stale["index"])
            host.link(
                "add",
                ifname=host_ifname,
                kind="veth",
                mtu=mtu,
                peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": netns_path(netns_name)},
            )
            host_end = link_by_name(host, host_ifname)
            assert host_end is not None
            host.link("set", index=host_end["index"], master=bridge["index"])
            enable_hairpin(host_ifname, ipr=host)
            host.link("set", index=host_end["index"], state="up")
            _configure_workload_side(workload, compartment, ip, mac, mtu)
    return netns_path(netns_name)


def detach_container(netns_name: str, host_netns: str | None = None) -> None:
    """Remove the workload's veth pair and its namespace. Idempotent: missing pieces are fine."""
    validate_netns_name(netns_name)
    # Delete the veth explicitly: namespace teardown is asynchronous and could leave the port around.
    delete_link(host_veth_name_for(netns_name), host_netns)
    delete_netns(netns_name)
