"""IPAM: pure subnet and address allocation."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from compute.network import ipam


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def test_it_allocates_the_lowest_free_subnet() -> None:
    taken = [net("10.64.0.0/24"), net("10.64.1.0/24"), net("10.64.3.0/24")]
    assert ipam.allocate_subnet(net("10.64.0.0/16"), 24, taken) == net("10.64.2.0/24")


def test_it_realigns_after_a_smaller_taken_network() -> None:
    taken = [net("10.64.0.0/28")]
    assert ipam.allocate_subnet(net("10.64.0.0/16"), 24, taken) == net("10.64.1.0/24")


def test_it_skips_the_hosts_own_networks() -> None:
    assert ipam.allocate_subnet(
        net("10.64.0.0/16"), 24, taken=[], host_networks=[net("10.64.0.0/23")]
    ) == net("10.64.2.0/24")


def test_it_reports_an_exhausted_pool() -> None:
    with pytest.raises(ipam.AddressPoolExhausted):
        ipam.allocate_subnet(net("10.64.0.0/23"), 24, [net("10.64.0.0/24"), net("10.64.1.0/24")])


@pytest.mark.parametrize("prefixlen", [15, 30, 32])
def test_it_refuses_prefixes_outside_the_limits(prefixlen: int) -> None:
    with pytest.raises(ValueError, match="too"):
        ipam.validate_compartment_subnet(IPv4Network((0x0A000000, prefixlen)))


@pytest.mark.parametrize("subnet", ["127.0.0.0/24", "169.254.0.0/24", "224.0.0.0/24", "240.0.0.0/24"])
def test_it_refuses_special_purpose_ranges(subnet: str) -> None:
    with pytest.raises(ValueError, match="special-purpose"):
        ipam.validate_compartment_subnet(net(subnet))


def test_it_names_the_overlapping_network() -> None:
    with pytest.raises(ValueError, match=r"10\.1\.0\.0/16"):
        ipam.check_no_overlap(net("10.1.2.0/24"), [net("10.1.0.0/16")])
    with pytest.raises(ValueError, match="host network"):
        ipam.check_no_overlap(net("192.0.2.0/25"), [], [net("192.0.2.0/24")])
    ipam.check_no_overlap(net("10.2.0.0/24"), [net("10.1.0.0/16")], [net("192.0.2.0/24")])


def test_it_allocates_addresses_around_the_gateway_and_taken_ones() -> None:
    subnet = net("10.9.0.0/29")
    taken = [IPv4Address("10.9.0.2"), IPv4Address("10.9.0.4")]
    assert ipam.allocate_address(subnet, taken) == IPv4Address("10.9.0.3")
    taken += [IPv4Address("10.9.0.3"), IPv4Address("10.9.0.5"), IPv4Address("10.9.0.6")]
    with pytest.raises(ipam.AddressPoolExhausted):
        ipam.allocate_address(subnet, taken)


def test_it_refuses_network_broadcast_and_gateway_as_member_addresses() -> None:
    subnet = net("10.9.0.0/24")
    gateway = ipam.gateway_for(subnet)
    for address in ("10.9.0.0", "10.9.0.255", "10.9.0.1", "10.9.1.7"):
        with pytest.raises(ValueError):
            ipam.validate_member_address(subnet, gateway, IPv4Address(address))
    assert ipam.validate_member_address(subnet, gateway, IPv4Address("10.9.0.9")) == IPv4Address("10.9.0.9")


def test_it_allocates_in_a_crowded_big_pool_without_enumerating_it() -> None:
    pool = net("10.0.0.0/8")
    taken = list(pool.subnets(new_prefix=20))[:4000]
    started = time.perf_counter()
    assert ipam.allocate_subnet(pool, 29, taken) == IPv4Network("10.250.0.0/29")
    # A guard against enumerating the pool (tens of seconds), not a measurement: see bench/.
    assert time.perf_counter() - started < 5
