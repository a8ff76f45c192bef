"""Names, validation and the generated nftables/dnsmasq documents: pure logic, no host needed."""

from __future__ import annotations

import dataclasses
import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from compute.network import dns, nftables
from compute.network.names import (
    bridge_name_for,
    host_veth_name_for,
    mac_for,
    validate_dns_label,
    vxlan_name_for,
)
from compute.network.spec import (
    CompartmentNet,
    HostNetworkState,
    PortBinding,
    PortMapping,
    validate_host_state,
)

INJECTIONS = ["a;b", "x\nserver=1.1.1.1", "web\x00", "Web", "-web", "a b", "a.b", "", "x" * 64, '"; drop']


def compartment(cid: str = "cmpa", subnet: str = "10.80.1.0/24", **changes: Any) -> CompartmentNet:
    network = IPv4Network(subnet)
    base = CompartmentNet(
        compartment_id=cid,
        bridge=bridge_name_for(cid),
        subnet=network,
        gateway=network.network_address + 1,
        dns_names={"web": network.network_address + 2},
    )
    return dataclasses.replace(base, **changes)


def test_it_makes_deterministic_locally_administered_unicast_macs() -> None:
    mac = mac_for("w-123")
    assert mac == mac_for("w-123") != mac_for("w-124")
    first_octet = int(mac.split(":")[0], 16)
    assert first_octet & 0x02 and not first_octet & 0x01
    assert len(mac.split(":")) == 6


def test_it_makes_short_prefixed_interface_names() -> None:
    for name in (bridge_name_for("c1"), vxlan_name_for("c1"), host_veth_name_for("bhw-some-workload")):
        assert len(name) <= 15 and name.startswith("bh") and name.isalnum()
    assert bridge_name_for("c1") == bridge_name_for("c1") != bridge_name_for("c2")


@pytest.mark.parametrize("label", INJECTIONS)
def test_it_refuses_names_that_are_not_dns_labels(label: str) -> None:
    with pytest.raises(ValueError):
        validate_dns_label(label)


@pytest.mark.parametrize("label", INJECTIONS)
def test_it_refuses_injected_workload_names_in_the_state(label: str) -> None:
    bad = compartment(dns_names={label: IPv4Address("10.80.1.5")})
    with pytest.raises(ValueError):
        validate_host_state(HostNetworkState("up0", [bad]))


@pytest.mark.parametrize("cid", ["a;b", "x\nserver=1.1.1.1", "cmp/../x"])
def test_it_refuses_injected_compartment_ids(cid: str) -> None:
    bad = dataclasses.replace(compartment(), compartment_id=cid)
    with pytest.raises(ValueError):
        validate_host_state(HostNetworkState("up0", [bad]))


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (HostNetworkState("up0", [compartment(), compartment("cmpb", "10.80.1.128/25")]), "overlaps"),
        (HostNetworkState("up0", [compartment(subnet="10.80.0.0/15", dns_names={})]), "too large"),
        (HostNetworkState("up0", [compartment(subnet="10.80.1.0/30", dns_names={})]), "too small"),
        (HostNetworkState("up0", [compartment(bridge="br0")]), "interface name"),
        (HostNetworkState("up0", [compartment(bridge="bhb;drop")]), "interface name"),
        (HostNetworkState("up0\n", [compartment()]), "interface name"),
        (HostNetworkState("up0", [compartment(gateway=IPv4Address("10.80.2.1"))]), "gateway"),
        (HostNetworkState("up0", [compartment(vni=0)]), "vni"),
        (HostNetworkState("up0", [compartment(vxlan_peers=[IPv4Address("198.18.0.3")])]), "without a vni"),
        (
            HostNetworkState("up0", [compartment()], [PortMapping("tcp", 80, IPv4Address("8.8.8.8"), 80)]),
            "no compartment",
        ),
        (
            HostNetworkState("up0", [compartment()], [PortMapping("sctp", 80, IPv4Address("10.80.1.2"), 80)]),
            "tcp or udp",
        ),  # type: ignore[arg-type]
        (
            HostNetworkState("up0", [compartment()], [PortMapping("tcp", 0, IPv4Address("10.80.1.2"), 80)]),
            "1..65535",
        ),
        (
            HostNetworkState(
                "up0",
                [compartment()],
                [
                    PortMapping("tcp", 80, IPv4Address("10.80.1.2"), 80),
                    PortMapping("tcp", 80, IPv4Address("10.80.1.3"), 81),
                ],
            ),
            "twice",
        ),
    ],
)
def test_it_refuses_inconsistent_state(state: HostNetworkState, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_host_state(state)


WEB_PORT, WEB_MAC, WEB_IP = host_veth_name_for("w1"), mac_for("w1"), IPv4Address("10.80.1.2")


@pytest.mark.parametrize(
    ("bindings", "message"),
    [
        ([PortBinding("eth0", WEB_MAC, WEB_IP)], "interface name"),
        ([PortBinding("bhv;drop", WEB_MAC, WEB_IP)], "interface name"),
        ([PortBinding(WEB_PORT, "01:00:5e:00:00:01", WEB_IP)], "multicast"),
        ([PortBinding(WEB_PORT, WEB_MAC.upper(), WEB_IP)], "lower case"),
        ([PortBinding(WEB_PORT, '02:00:00:00:00:01" . 1', WEB_IP)], "MAC"),
        ([PortBinding(WEB_PORT, WEB_MAC, "10.80.1.2")], "IPv4Address"),  # type: ignore[arg-type]
        ([PortBinding(WEB_PORT, WEB_MAC, IPv4Address("10.80.9.2"))], "no compartment"),
        ([PortBinding(WEB_PORT, WEB_MAC, IPv4Address("10.80.1.1"))], "gateway"),
        ([PortBinding(WEB_PORT, WEB_MAC, WEB_IP), PortBinding(WEB_PORT, mac_for("w2"), WEB_IP + 1)], "twice"),
        (
            [
                PortBinding(WEB_PORT, WEB_MAC, WEB_IP),
                PortBinding(host_veth_name_for("w2"), WEB_MAC, WEB_IP + 1),
            ],
            "twice",
        ),
        (
            [
                PortBinding(WEB_PORT, WEB_MAC, WEB_IP),
                PortBinding(host_veth_name_for("w2"), mac_for("w2"), WEB_IP),
            ],
            "twice",
        ),
    ],
)
def test_it_refuses_port_bindings_that_are_not_a_workloads_own(
    bindings: list[PortBinding], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        validate_host_state(HostNetworkState("up0", [compartment()], bindings=bindings))


def test_it_binds_ports_in_sets_so_the_rules_do_not_grow_with_workloads() -> None:
    def bridge_rules(workloads: int) -> list[dict[str, Any]]:
        bindings = [
            PortBinding(host_veth_name_for(f"w{i}"), mac_for(f"w{i}"), IPv4Address("10.80.0.0") + 2 + i)
            for i in range(workloads)
        ]
        state = HostNetworkState("up0", [compartment(subnet="10.80.0.0/16", dns_names={})], bindings=bindings)
        commands = nftables.build_ruleset(state)["nftables"]
        return [
            c["add"]["rule"] for c in commands if c.get("add", {}).get("rule", {}).get("family") == "bridge"
        ]

    assert bridge_rules(2) == bridge_rules(500)


def test_it_refuses_a_subnet_that_overlaps_the_hosts_own_networks() -> None:
    with pytest.raises(ValueError, match="host network"):
        validate_host_state(HostNetworkState("up0", [compartment()]), [IPv4Network("10.80.0.0/16")])


def test_it_keeps_the_rule_count_independent_of_the_number_of_published_ports() -> None:
    def rules_and_elements(ports: int) -> tuple[int, int]:
        state = HostNetworkState(
            "up0",
            [compartment(subnet="10.80.0.0/16")],
            [PortMapping("tcp", 10000 + i, IPv4Address("10.80.1.2"), 80) for i in range(ports)],
        )
        commands = nftables.build_ruleset(state)["nftables"]
        rules = sum(1 for c in commands if "rule" in c.get("add", {}))
        maps = [c["add"]["map"] for c in commands if "map" in c.get("add", {})]
        return rules, sum(len(m.get("elem", [])) for m in maps)

    assert rules_and_elements(10)[0] == rules_and_elements(1000)[0]
    assert rules_and_elements(1000)[1] == 2000  # address map + port map


def test_it_puts_names_into_nft_json_as_values_only() -> None:
    state = HostNetworkState("up0", [compartment()], [PortMapping("udp", 53, IPv4Address("10.80.1.2"), 5353)])
    document = json.dumps(nftables.build_ruleset(state))
    assert '"bhb' in document and "up0" in document
    assert {"add": {"table": {"family": "inet", "name": "bulkhead"}}} in nftables.build_ruleset(state)[
        "nftables"
    ]


def test_it_writes_both_short_and_qualified_names_into_the_hosts_file() -> None:
    hosts = dns.render_hosts(
        compartment(dns_names={"web": IPv4Address("10.80.1.2"), "db": IPv4Address("10.80.1.3")})
    )
    assert hosts.splitlines()[1:] == ["10.80.1.3 db db.cmpa", "10.80.1.2 web web.cmpa"]


def test_it_binds_dnsmasq_to_the_gateway_only() -> None:
    config = dns.render_config(compartment(), Path("/run/bulkhead/network/root/dns/cmpa"))
    assert "listen-address=10.80.1.1" in config.splitlines()
    assert "bind-interfaces" in config.splitlines()
    assert "except-interface=lo" in config.splitlines()
    assert not any(line.startswith("server=") for line in config.splitlines())


def test_it_refuses_a_state_directory_that_could_inject_config() -> None:
    with pytest.raises(ValueError):
        dns.render_config(compartment(), Path("/tmp/x\nserver=1.1.1.1"))
