"""Host network driver for compartments: bridges, veths, nftables, dnsmasq, VXLAN.

Plain frozen values in (spec.py), real work on the host out; no Django models here. The public entry
points are re-exported below; see each module for the pieces.
"""

from compute.network.attach import CompartmentMissing, attach_container, detach_container
from compute.network.host_state import ApplyReport, apply_host_network, remove_host_network
from compute.network.names import bridge_name_for, mac_for
from compute.network.spec import CompartmentNet, HostNetworkState, PortBinding, PortMapping

__all__ = [
    "ApplyReport",
    "CompartmentMissing",
    "CompartmentNet",
    "HostNetworkState",
    "PortBinding",
    "PortMapping",
    "apply_host_network",
    "attach_container",
    "bridge_name_for",
    "detach_container",
    "mac_for",
    "remove_host_network",
]
