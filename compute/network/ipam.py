"""IP address management: pure functions over ipaddress objects, no I/O.

The server calls these to pick a compartment subnet from a pool and addresses inside it; the host driver
calls the same checks again before touching the host, so a bad value is refused in both places.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

# /16 is the largest compartment that keeps one broadcast domain sane; /29 leaves gateway + 5 workloads.
MIN_PREFIXLEN = 16
MAX_PREFIXLEN = 29


class AddressPoolExhausted(ValueError):
    """No free subnet or address is left in the pool."""


def validate_compartment_subnet(
    subnet: IPv4Network, *, min_prefixlen: int = MIN_PREFIXLEN, max_prefixlen: int = MAX_PREFIXLEN
) -> IPv4Network:
    """Return `subnet` if it is usable as a compartment subnet, else raise ValueError."""
    if not isinstance(subnet, IPv4Network):
        raise ValueError(f"subnet must be an IPv4Network, got {type(subnet).__name__}")
    if subnet.prefixlen < min_prefixlen:
        raise ValueError(f"subnet {subnet} is too large: prefix must be /{min_prefixlen} or longer")
    if subnet.prefixlen > max_prefixlen:
        raise ValueError(f"subnet {subnet} is too small: prefix must be /{max_prefixlen} or shorter")
    if (
        subnet.is_loopback
        or subnet.is_multicast
        or subnet.is_link_local
        or subnet.is_reserved
        or subnet.is_unspecified
    ):
        raise ValueError(f"subnet {subnet} is in a special-purpose range")
    return subnet


def find_overlap(candidate: IPv4Network, existing: Iterable[IPv4Network]) -> IPv4Network | None:
    """Return the first network in `existing` that overlaps `candidate`, or None."""
    for network in existing:
        if candidate.overlaps(network):
            return network
    return None


def check_no_overlap(
    candidate: IPv4Network,
    taken: Iterable[IPv4Network],
    host_networks: Iterable[IPv4Network] = (),
) -> None:
    """Raise ValueError if `candidate` overlaps another compartment or one of the host's own networks."""
    clash = find_overlap(candidate, taken)
    if clash is not None:
        raise ValueError(f"subnet {candidate} overlaps compartment subnet {clash}")
    clash = find_overlap(candidate, host_networks)
    if clash is not None:
        raise ValueError(f"subnet {candidate} overlaps host network {clash}")


def allocate_subnet(
    pool: IPv4Network,
    prefixlen: int,
    taken: Iterable[IPv4Network],
    host_networks: Iterable[IPv4Network] = (),
) -> IPv4Network:
    """Return the lowest free subnet of size /`prefixlen` inside `pool`.

    Walks the gaps between the sorted taken networks instead of enumerating every candidate, so a /8
    pool carved into /29s costs O(n log n) in the number of taken networks, not 2**21 steps.
    """
    if prefixlen < pool.prefixlen:
        raise ValueError(f"prefix /{prefixlen} is larger than pool {pool}")
    validate_compartment_subnet(IPv4Network((pool.network_address, prefixlen)))
    blocked = sorted(
        (n for n in (*taken, *host_networks) if n.overlaps(pool)),
        key=lambda n: int(n.network_address),
    )
    size = 1 << (32 - prefixlen)
    candidate_start = int(pool.network_address)
    pool_end = int(pool.broadcast_address)
    for network in blocked:
        candidate_end = candidate_start + size - 1
        if candidate_end > pool_end:
            break
        if int(network.network_address) > candidate_end:
            break
        if int(network.broadcast_address) >= candidate_start:
            # Jump past the blocking network and realign to the subnet size.
            next_free = int(network.broadcast_address) + 1
            candidate_start = (next_free + size - 1) // size * size
    if candidate_start + size - 1 > pool_end:
        raise AddressPoolExhausted(f"no free /{prefixlen} left in {pool}")
    return IPv4Network((candidate_start, prefixlen))


def gateway_for(subnet: IPv4Network) -> IPv4Address:
    """The gateway of a compartment: by convention its first host address."""
    return subnet.network_address + 1


def usable_hosts(subnet: IPv4Network) -> range:
    """Integer range of host addresses (network and broadcast excluded)."""
    return range(int(subnet.network_address) + 1, int(subnet.broadcast_address))


def validate_member_address(subnet: IPv4Network, gateway: IPv4Address, address: IPv4Address) -> IPv4Address:
    """Return `address` if a workload may use it in `subnet`, else raise ValueError."""
    if not isinstance(address, IPv4Address):
        raise ValueError(f"address must be an IPv4Address, got {type(address).__name__}")
    if int(address) not in usable_hosts(subnet):
        raise ValueError(f"address {address} is not a host address of {subnet}")
    if address == gateway:
        raise ValueError(f"address {address} is the gateway of {subnet}")
    return address


def allocate_address(
    subnet: IPv4Network, taken: Iterable[IPv4Address], gateway: IPv4Address | None = None
) -> IPv4Address:
    """Return the lowest free workload address in `subnet` (the gateway is always treated as taken)."""
    used = sorted({int(a) for a in taken} | {int(gateway or gateway_for(subnet))})
    hosts = usable_hosts(subnet)
    candidate = hosts.start
    index = bisect.bisect_left(used, candidate)
    while candidate < hosts.stop:
        if index < len(used) and used[index] == candidate:
            candidate += 1
            index += 1
            continue
        if index < len(used) and used[index] < candidate:
            index += 1
            continue
        return IPv4Address(candidate)
    raise AddressPoolExhausted(f"no free address left in {subnet}")
