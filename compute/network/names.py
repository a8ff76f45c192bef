"""Generated names for host-side network objects, and validation of every name that reaches the host.

Linux interface names are at most 15 bytes, so objects are named by a short prefix that marks them as
Bulkhead's plus a hash of the server id. The prefixes double as ownership markers: apply removes
only objects that carry them.
"""

from __future__ import annotations

import hashlib
import re

BRIDGE_PREFIX = "bhb"
VXLAN_PREFIX = "bhx"
HOST_VETH_PREFIX = "bhv"
# The container side is created under a temporary name in the host namespace's view and renamed to
# eth0 inside the workload namespace.
CONTAINER_IFNAME = "eth0"

IFNAME_MAX = 15
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_OWNED_IFNAME_RE = re.compile(r"^bh[bxv][0-9a-z]{1,12}$")
# RFC 1123 host label, lower case only: the server generates these, so upper case is a bug upstream.
_DNS_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Named network namespaces live as files under /run/netns: no slashes, no dots at the start.
_NETNS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


def short_hash(text: str, length: int = 8) -> str:
    """Return the first `length` hex digits of the SHA-256 of `text` (stable across hosts and runs)."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def bridge_name_for(compartment_id: str) -> str:
    """Name of the Linux bridge that realises a compartment on a host, e.g. ``bhb1a2b3c4d``."""
    return BRIDGE_PREFIX + short_hash("bridge:" + compartment_id)


def vxlan_name_for(compartment_id: str) -> str:
    """Name of the VXLAN device that carries a compartment between hosts, e.g. ``bhx1a2b3c4d``."""
    return VXLAN_PREFIX + short_hash("vxlan:" + compartment_id)


def host_veth_name_for(netns_name: str) -> str:
    """Name of the host end of the veth pair that connects a workload namespace to its bridge."""
    return HOST_VETH_PREFIX + short_hash("veth:" + netns_name, 12)


def mac_for(object_id: str) -> str:
    """Deterministic, locally administered unicast MAC for a workload or gateway id.

    The first octet is 0x02 (locally administered, unicast); the other five come from a hash of the id,
    so a VM and a container of the same id get the same address on every host and every restart.
    """
    digest = hashlib.sha256(("mac:" + object_id).encode()).digest()
    return ":".join(f"{octet:02x}" for octet in (0x02, *digest[:5]))


def gateway_mac_for(compartment_id: str) -> str:
    """MAC of a compartment's gateway: the same on every host so a VXLAN-spanning gateway is anycast."""
    return mac_for("gateway:" + compartment_id)


def validate_ifname(name: str) -> str:
    """Return `name` if it is a plausible Linux interface name, else raise ValueError."""
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name):
        raise ValueError(f"invalid interface name: {name!r}")
    return name


def validate_owned_ifname(name: str, prefix: str) -> str:
    """Return `name` if it is a Bulkhead-owned interface name with `prefix`, else raise ValueError."""
    if not isinstance(name, str) or not _OWNED_IFNAME_RE.fullmatch(name) or not name.startswith(prefix):
        raise ValueError(f"invalid {prefix}* interface name: {name!r}")
    return name


def validate_dns_label(label: str) -> str:
    """Return `label` if it is a lower-case RFC 1123 host label, else raise ValueError.

    Everything that ends up in a dnsmasq hosts or config file passes through here, so a name such as
    ``"x\\nserver=1.1.1.1"`` or ``"a;b"`` can never become a directive.
    """
    if not isinstance(label, str) or not _DNS_LABEL_RE.fullmatch(label):
        raise ValueError(f"invalid DNS label: {label!r}")
    return label


def validate_netns_name(name: str) -> str:
    """Return `name` if it is a safe name for a named network namespace, else raise ValueError."""
    if not isinstance(name, str) or not _NETNS_RE.fullmatch(name):
        raise ValueError(f"invalid network namespace name: {name!r}")
    return name


def validate_mac(mac: str) -> str:
    """Return `mac` (lower case) if it is a unicast MAC address, else raise ValueError."""
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac.lower()):
        raise ValueError(f"invalid MAC address: {mac!r}")
    if int(mac[:2], 16) & 0x01:
        raise ValueError(f"MAC address is multicast: {mac!r}")
    if mac.lower() == "00:00:00:00:00:00":
        raise ValueError("MAC address is all zeros")
    return mac.lower()
