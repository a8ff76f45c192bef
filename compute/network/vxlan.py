"""VXLAN devices that stretch a compartment's bridge across hosts.

One device per compartment per host: VNI = the compartment's, UDP 4789, the host's underlay address as
source. Broadcast and unknown unicast go to every peer through all-zero FDB entries (head-end
replication, no multicast needed on the underlay); unicast MACs are learnt from received frames.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from compute.network.bridge import link_by_name, link_kind, rtnl
from compute.network.names import VXLAN_PREFIX, validate_owned_ifname
from compute.network.spec import VXLAN_PORT

AF_BRIDGE = 7
IFF_UP = 0x1
FLOOD_MAC = "00:00:00:00:00:00"


def _vxlan_settings(link: ifinfmsg) -> tuple[int | None, str | None, int | None]:
    data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    if data is None:
        return None, None, None
    return data.get_attr("IFLA_VXLAN_ID"), data.get_attr("IFLA_VXLAN_LOCAL"), data.get_attr("IFLA_VXLAN_PORT")


def flood_peers(ipr: IPRoute, index: int) -> set[str]:
    """Underlay addresses in the all-zero (flood) FDB entries of VXLAN device `index`."""
    peers: set[str] = set()
    for entry in ipr.fdb("dump", ifindex=index, family=AF_BRIDGE):
        if entry["ifindex"] != index or entry.get_attr("NDA_LLADDR") != FLOOD_MAC:
            continue
        destination = entry.get_attr("NDA_DST")
        if destination:
            peers.add(destination)
    return peers


def ensure_vxlan(
    name: str,
    vni: int,
    local: IPv4Address,
    peers: Iterable[IPv4Address],
    bridge_index: int,
    mtu: int,
    host_netns: str | None = None,
    *,
    ipr: IPRoute | None = None,
) -> list[str]:
    """Make VXLAN device `name` exist with `vni`/`local`, enslaved to the bridge, flooding to `peers`.

    Returns what had to change (empty when it was already right).
    """
    validate_owned_ifname(name, VXLAN_PREFIX)
    wanted_peers = {str(peer) for peer in peers}
    changes: list[str] = []
    with rtnl(ipr, host_netns) as sock:
        link = link_by_name(sock, name)
        if link is not None and (
            link_kind(link) != "vxlan" or _vxlan_settings(link) != (vni, str(local), VXLAN_PORT)
        ):
            # VNI, local address and port cannot be changed in place.
            sock.link("del", index=link["index"])
            changes.append("replaced")
            link = None
        if link is None:
            sock.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=vni,
                vxlan_local=str(local),
                vxlan_port=VXLAN_PORT,
                vxlan_learning=1,
                mtu=mtu,
            )
            if not changes:
                changes.append("created")
            link = link_by_name(sock, name)
            assert link is not None
        index = link["index"]
        if link.get_attr("IFLA_MTU") != mtu:
            sock.link("set", index=index, mtu=mtu)
            changes.append(f"mtu set to {mtu}")
        if link.get_attr("IFLA_MASTER") != bridge_index:
            sock.link("set", index=index, master=bridge_index)
            changes.append("enslaved to bridge")
        present = flood_peers(sock, index)
        for peer in sorted(present - wanted_peers):
            sock.fdb("del", ifindex=index, lladdr=FLOOD_MAC, dst=peer)
            changes.append(f"peer {peer} removed")
        for peer in sorted(wanted_peers - present):
            sock.fdb("append", ifindex=index, lladdr=FLOOD_MAC, dst=peer)
            changes.append(f"peer {peer} added")
        if not link["flags"] & IFF_UP:
            sock.link("set", index=index, state="up")
            if "created" not in changes and "replaced" not in changes:
                changes.append("up")
    return changes
