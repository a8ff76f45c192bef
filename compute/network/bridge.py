"""Compartment bridges: one Linux bridge per compartment per host, carrying the gateway address."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from compute.network.names import BRIDGE_PREFIX, validate_ifname, validate_mac, validate_owned_ifname
from compute.network.netns import ensure_sysctl, iproute

AF_INET = 2
ENODEV = 19
IFF_UP = 0x1


@contextmanager
def rtnl(ipr: IPRoute | None, host_netns: str | None) -> Iterator[IPRoute]:
    """Reuse the caller's RTNL socket if given (apply opens one per run), else open one in `host_netns`."""
    if ipr is not None:
        yield ipr
        return
    with iproute(host_netns) as own:
        yield own


def link_by_name(ipr: IPRoute, name: str) -> ifinfmsg | None:
    """The RTNL link message of interface `name`, or None if it does not exist."""
    try:
        links = ipr.get_links(ifname=name)
    except NetlinkError as error:
        if error.code == ENODEV:
            return None
        raise
    return links[0] if links else None


def link_kind(link: ifinfmsg) -> str | None:
    """The rtnl_link kind of a link message ("bridge", "veth", "vxlan", ...)."""
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def list_owned_links(ipr: IPRoute, prefix: str) -> dict[str, int]:
    """Interfaces whose names start with one of Bulkhead's prefixes, name -> ifindex."""
    found: dict[str, int] = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if name and name.startswith(prefix):
            found[name] = link["index"]
    return found


def ensure_bridge(
    name: str,
    gateway: IPv4Interface,
    mac: str,
    mtu: int,
    host_netns: str | None = None,
    *,
    ipr: IPRoute | None = None,
) -> list[str]:
    """Make bridge `name` exist, up, with exactly the gateway address, MAC and MTU given.

    Returns what had to change (empty when the bridge was already right), e.g. ``["created"]`` or
    ``["address 10.0.0.1/24 added"]``.
    """
    validate_owned_ifname(name, BRIDGE_PREFIX)
    mac = validate_mac(mac)
    changes: list[str] = []
    with rtnl(ipr, host_netns) as sock:
        link = link_by_name(sock, name)
        if link is not None and link_kind(link) != "bridge":
            sock.link("del", index=link["index"])
            changes.append(f"removed non-bridge link {name}")
            link = None
        if link is None:
            sock.link("add", ifname=name, kind="bridge", address=mac, mtu=mtu, br_stp_state=0)
            changes.append("created")
            link = link_by_name(sock, name)
            assert link is not None
        index = link["index"]
        if link.get_attr("IFLA_ADDRESS") != mac:
            sock.link("set", index=index, address=mac)
            changes.append(f"mac set to {mac}")
        if link.get_attr("IFLA_MTU") != mtu:
            sock.link("set", index=index, mtu=mtu)
            changes.append(f"mtu set to {mtu}")
        # No IPv6 on compartment bridges: no link-local address a workload could reach the host on.
        if ensure_sysctl(f"net.ipv6.conf.{name}.disable_ipv6", "1", host_netns):
            changes.append("ipv6 disabled")
        wanted = (str(gateway.ip), gateway.network.prefixlen)
        present = {
            (a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in sock.get_addr(family=AF_INET, index=index)
        }
        for address, prefixlen in present - {wanted}:
            sock.addr("del", index=index, address=address, prefixlen=prefixlen)
            changes.append(f"stale address {address}/{prefixlen} removed")
        if wanted not in present:
            sock.addr(
                "add",
                index=index,
                address=wanted[0],
                prefixlen=wanted[1],
                broadcast=str(gateway.network.broadcast_address),
            )
            changes.append(f"address {gateway} added")
        if not link["flags"] & IFF_UP:
            sock.link("set", index=index, state="up")
            changes.append("up")
    return changes


def delete_link(name: str, host_netns: str | None = None, *, ipr: IPRoute | None = None) -> bool:
    """Delete interface `name` if it exists; True if it did. Idempotent."""
    with rtnl(ipr, host_netns) as sock:
        link = link_by_name(sock, name)
        if link is None:
            return False
        try:
            sock.link("del", index=link["index"])
        except NetlinkError as error:
            if error.code != ENODEV:
                raise
            return False
    return True


def delete_bridge(name: str, host_netns: str | None = None, *, ipr: IPRoute | None = None) -> bool:
    """Delete compartment bridge `name` (its ports are released, not deleted); True if it existed."""
    validate_owned_ifname(name, BRIDGE_PREFIX)
    return delete_link(name, host_netns, ipr=ipr)


def list_bridges(host_netns: str | None = None, *, ipr: IPRoute | None = None) -> list[str]:
    """Names of the compartment bridges (``bhb*``) present in `host_netns`."""
    with rtnl(ipr, host_netns) as sock:
        return sorted(list_owned_links(sock, BRIDGE_PREFIX))


def enable_hairpin(port: str, host_netns: str | None = None, *, ipr: IPRoute | None = None) -> bool:
    """Turn on hairpin mode on bridge port `port` (a veth or a VM's tap); True if it changed.

    Needed for a workload to reach its own published port while br_netfilter is active: the DNATed
    reply frames must leave by the port they came in by. The libvirt driver calls this for VM taps.
    """
    with rtnl(ipr, host_netns) as sock:
        link = link_by_name(sock, validate_ifname(port))
        if link is None:
            raise ValueError(f"bridge port {port!r} does not exist")
        port_info = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA")
        if port_info is not None and port_info.get_attr("IFLA_BRPORT_MODE") == 1:
            return False
        sock.brport("set", index=link["index"], mode=1)
    return True
