"""apply_host_network on a real (namespaced) host: idempotence, repair, removal, refusal, attach."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from nettopo import Host, leftovers, lonely_host, new_token, nslookup, sweep, tcp_connects, wait_for

from compute.network import (
    CompartmentMissing,
    CompartmentNet,
    HostNetworkState,
    PortBinding,
    PortMapping,
    apply_host_network,
    attach_container,
    detach_container,
    mac_for,
    nftables,
    remove_host_network,
)
from compute.network.bridge import enable_hairpin, link_by_name, list_bridges, list_owned_links
from compute.network.dns import list_dns, running_pid, state_dir_for
from compute.network.names import bridge_name_for, host_veth_name_for, vxlan_name_for
from compute.network.netns import iproute, netns_exists, ns_command, read_sysctl

NEEDS_HOST = True


def compartment(cid: str = "cmpa", subnet: str = "10.80.1.0/24", **extra: object) -> CompartmentNet:
    network = IPv4Network(subnet)
    base = CompartmentNet(
        compartment_id=cid,
        bridge=bridge_name_for(cid),
        subnet=network,
        gateway=network.network_address + 1,
        dns_names={"web": network.network_address + 2},
    )
    return dataclasses.replace(base, **extra)  # type: ignore[arg-type]


def full_state() -> HostNetworkState:
    return HostNetworkState(
        "up0",
        [compartment(), compartment("cmpb", "10.80.2.0/24", vni=77, vxlan_peers=[IPv4Address("198.18.7.3")])],
        [PortMapping("tcp", 8080, IPv4Address("10.80.1.2"), 80)],
    )


def nft(host: Host, *argv: str) -> None:
    subprocess.run(ns_command(["nft", *argv], host.netns), check=True, capture_output=True)


def test_it_reports_nothing_when_the_same_state_is_applied_twice(lonely: Host) -> None:
    first = apply_host_network(full_state(), lonely.netns)
    assert first.changed and not first.repaired
    second = apply_host_network(full_state(), lonely.netns)
    assert second.changed == [] and second.repaired == [] and second.unchanged
    assert read_sysctl("net.ipv4.ip_forward", lonely.netns) == "1"


def test_it_lists_the_kernels_rules_before_a_load_only_when_they_should_be_unchanged(
    lonely: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    listings: list[str | None] = []
    real_list_owned = nftables.list_owned

    def list_owned(host_netns: str | None = None) -> dict[str, list[nftables.Json]]:
        listings.append(host_netns)  # the real listing, counted: each is an `nft` run on a create's path
        return real_list_owned(host_netns)

    monkeypatch.setattr(nftables, "list_owned", list_owned)
    apply_host_network(full_state(), lonely.netns)
    assert len(listings) == 1  # after the load, for the record; the rules were new: nothing to compare
    with_port = dataclasses.replace(
        full_state(), ports=[*full_state().ports, PortMapping("tcp", 8081, IPv4Address("10.80.1.3"), 80)]
    )
    assert apply_host_network(with_port, lonely.netns).changed == ["nftables: rules replaced"]
    assert len(listings) == 2
    assert apply_host_network(with_port, lonely.netns).unchanged  # the same rules: compared, not loaded
    assert len(listings) == 3
    nft(lonely, "flush", "chain", "inet", "bulkhead", "forward")
    report = apply_host_network(with_port, lonely.netns)
    assert report.repaired == ["nftables: rules restored after an outside change"]
    assert len(listings) == 5


def test_it_recreates_a_table_deleted_from_outside_and_says_so(lonely: Host) -> None:
    apply_host_network(full_state(), lonely.netns)
    nft(lonely, "delete", "table", "inet", "bulkhead")
    report = apply_host_network(full_state(), lonely.netns)
    assert report.changed == []
    assert report.repaired == ["nftables: table inet bulkhead recreated"]
    assert "inet bulkhead" in nftables.list_owned(lonely.netns)
    assert apply_host_network(full_state(), lonely.netns).unchanged


def test_it_restores_rules_changed_from_outside(lonely: Host) -> None:
    apply_host_network(full_state(), lonely.netns)
    nft(lonely, "flush", "chain", "inet", "bulkhead", "forward")
    report = apply_host_network(full_state(), lonely.netns)
    assert report.repaired == ["nftables: rules restored after an outside change"]


def test_it_repairs_a_deleted_bridge_and_a_killed_dnsmasq(lonely: Host) -> None:
    state = full_state()
    apply_host_network(state, lonely.netns)
    bridge = state.compartments[0].bridge
    subprocess.run(ns_command(["ip", "link", "del", bridge], lonely.netns), check=True)
    dns_dir = state_dir_for(lonely.netns) / "dns" / "cmpb"
    pid = running_pid(dns_dir, lonely.netns)
    assert pid is not None
    subprocess.run(["kill", str(pid)], check=True)
    wait_for(lambda: running_pid(dns_dir, lonely.netns) is None)

    report = apply_host_network(state, lonely.netns)

    assert report.changed == []
    assert any(line.startswith(f"bridge {bridge}: created") for line in report.repaired)
    assert "dns cmpb: started" in report.repaired
    assert bridge in list_bridges(lonely.netns)
    assert nslookup(lonely.netns, "web.cmpb", IPv4Address("10.80.2.1")) == ["10.80.2.2"]


def test_it_removes_everything_of_a_compartment_dropped_from_the_state(lonely: Host) -> None:
    apply_host_network(full_state(), lonely.netns)
    assert vxlan_name_for("cmpb") in list_owned_links_in(lonely)
    smaller = HostNetworkState("up0", [compartment()], full_state().ports)

    report = apply_host_network(smaller, lonely.netns)

    assert f"bridge {bridge_name_for('cmpb')}: removed" in report.changed
    assert f"vxlan {vxlan_name_for('cmpb')}: removed" in report.changed
    assert "dns cmpb: stopped" in report.changed
    assert list_bridges(lonely.netns) == [bridge_name_for("cmpa")]
    assert vxlan_name_for("cmpb") not in list_owned_links_in(lonely)
    assert list_dns(state_dir_for(lonely.netns)) == ["cmpa"]


def list_owned_links_in(host: Host) -> dict[str, int]:
    with iproute(host.netns) as ipr:
        return list_owned_links(ipr, "bh")


def test_it_reloads_dns_when_names_change(lonely: Host) -> None:
    apply_host_network(HostNetworkState("up0", [compartment()]), lonely.netns)
    gateway = IPv4Address("10.80.1.1")
    assert nslookup(lonely.netns, "web", gateway) == ["10.80.1.2"]
    renamed = compartment(dns_names={"web": IPv4Address("10.80.1.2"), "cache": IPv4Address("10.80.1.9")})

    report = apply_host_network(HostNetworkState("up0", [renamed]), lonely.netns)

    assert report.changed == ["dns cmpa: reloaded"]
    wait_for(lambda: nslookup(lonely.netns, "cache.cmpa", gateway) == ["10.80.1.9"])


@pytest.mark.parametrize(
    "bad_state",
    [
        pytest.param(
            HostNetworkState("up0", [compartment(), compartment("cmpb", "10.80.1.128/25")]), id="overlapping"
        ),
        pytest.param(HostNetworkState("up0", [compartment("cmpa", "10.80.0.0/15")]), id="prefix-too-short"),
        pytest.param(HostNetworkState("up0", [compartment("cmpa", "10.80.1.0/30")]), id="prefix-too-long"),
        pytest.param(HostNetworkState("up0", [compartment("cmpa", "198.18.7.0/25")]), id="overlaps-uplink"),
        pytest.param(
            HostNetworkState("up0", [compartment(dns_names={"a;b": IPv4Address("10.80.1.2")})]),
            id="semicolon",
        ),
        pytest.param(
            HostNetworkState("up0", [compartment(dns_names={"x\nserver=1.1.1.1": IPv4Address("10.80.1.2")})]),
            id="newline",
        ),
        pytest.param(HostNetworkState("nope0", [compartment()]), id="missing-uplink"),
    ],
)
def test_it_refuses_bad_input_before_touching_the_host(lonely: Host, bad_state: HostNetworkState) -> None:
    with pytest.raises(ValueError):
        apply_host_network(bad_state, lonely.netns)
    assert list_bridges(lonely.netns) == []
    assert nftables.list_owned(lonely.netns) == {}
    assert list_dns(state_dir_for(lonely.netns)) == []
    assert read_sysctl("net.ipv4.ip_forward", lonely.netns) == "0"


def test_it_applies_a_thousand_published_ports_within_a_second(lonely: Host) -> None:
    base = HostNetworkState("up0", [compartment("cmpa", "10.80.0.0/16")])
    apply_host_network(base, lonely.netns)
    ports = [PortMapping("tcp", 20000 + i, IPv4Address("10.80.1.2"), 80) for i in range(1000)]
    started = time.perf_counter()
    report = apply_host_network(HostNetworkState("up0", base.compartments, ports), lonely.netns)
    # A guard against per-port rules (many seconds), not a measurement: bench/bench_network.py measures.
    assert time.perf_counter() - started < 10
    assert report.changed == ["nftables: rules replaced"]


def test_it_attaches_and_detaches_a_container_idempotently(lonely: Host) -> None:
    comp = compartment()
    apply_host_network(HostNetworkState("up0", [comp]), lonely.netns)
    workload_ns = lonely.netns.replace("bhtnl", "bhtnw")

    path = attach_container(comp, workload_ns, IPv4Address("10.80.1.2"), mac_for("w1"), lonely.netns)

    assert path == f"/run/netns/{workload_ns}" and Path(path).exists()
    assert attach_container(comp, workload_ns, IPv4Address("10.80.1.2"), mac_for("w1"), lonely.netns) == path
    with iproute(lonely.netns) as ipr:
        port = link_by_name(ipr, host_veth_name_for(workload_ns))
        bridge = link_by_name(ipr, comp.bridge)
        assert port is not None and bridge is not None and port.get_attr("IFLA_MASTER") == bridge["index"]
    with iproute(workload_ns) as ipr:
        eth0 = link_by_name(ipr, "eth0")
        assert eth0 is not None and eth0.get_attr("IFLA_ADDRESS") == mac_for("w1")
    # A port nobody bound sends nothing, not even to its own gateway.
    assert not tcp_connects(workload_ns, str(comp.gateway), 53)
    # Bound to the workload's MAC and address, it reaches its gateway's DNS.
    binding = PortBinding(host_veth_name_for(workload_ns), mac_for("w1"), IPv4Address("10.80.1.2"))
    apply_host_network(HostNetworkState("up0", [comp], bindings=[binding]), lonely.netns)
    assert nslookup(workload_ns, "web", comp.gateway) == ["10.80.1.2"]

    detach_container(workload_ns, lonely.netns)
    detach_container(workload_ns, lonely.netns)
    assert not netns_exists(workload_ns)
    with iproute(lonely.netns) as ipr:
        assert link_by_name(ipr, host_veth_name_for(workload_ns)) is None


def test_it_refuses_to_attach_to_a_compartment_that_is_not_on_the_host(lonely: Host) -> None:
    with pytest.raises(CompartmentMissing):
        attach_container(compartment(), "bhtnwmissing", IPv4Address("10.80.1.2"), mac_for("w"), lonely.netns)
    assert not netns_exists("bhtnwmissing")


def test_it_removes_everything_when_the_state_is_empty(lonely: Host) -> None:
    apply_host_network(full_state(), lonely.netns)
    report = apply_host_network(HostNetworkState("up0"), lonely.netns)
    assert "nftables: tables removed" in report.changed
    assert list_owned_links_in(lonely) == {}
    assert nftables.list_owned(lonely.netns) == {}
    assert list_dns(state_dir_for(lonely.netns)) == []


def test_it_leaves_nothing_behind_after_detach_and_removal(lonely: Host) -> None:
    comp = compartment()
    apply_host_network(HostNetworkState("up0", [comp], full_state().ports), lonely.netns)
    workload_ns = lonely.netns.replace("bhtnl", "bhtnw")
    attach_container(comp, workload_ns, IPv4Address("10.80.1.2"), mac_for("w1"), lonely.netns)

    detach_container(workload_ns, lonely.netns)
    report = remove_host_network(lonely.netns)

    assert "nftables: tables removed" in report.changed
    assert list_owned_links_in(lonely) == {}
    assert nftables.list_owned(lonely.netns) == {}
    assert list_dns(state_dir_for(lonely.netns)) == []
    assert leftovers(lonely.netns.removeprefix("bhtnl")) == [
        f"netns {lonely.netns}",
        f"state {state_dir_for(lonely.netns)}",
    ]


def test_it_sweeps_the_leftovers_of_an_interrupted_run() -> None:
    token = new_token()
    host = lonely_host(token)
    comp = compartment()
    apply_host_network(HostNetworkState("up0", [comp]), host.netns)
    attach_container(comp, f"bhtnw{token}", IPv4Address("10.80.1.2"), mac_for("w1"), host.netns)
    assert any(item.startswith("dnsmasq") for item in leftovers(token))

    sweep(token)  # what the fixtures do when a test dies half-way

    assert leftovers(token) == []


def test_it_turns_on_hairpin_mode_on_a_bridge_port_once(lonely: Host) -> None:
    comp = compartment()
    apply_host_network(HostNetworkState("up0", [comp]), lonely.netns)
    subprocess.run(ns_command(["ip", "tuntap", "add", "bhvtaptest", "mode", "tap"], lonely.netns), check=True)
    subprocess.run(
        ns_command(["ip", "link", "set", "bhvtaptest", "master", comp.bridge], lonely.netns), check=True
    )

    assert enable_hairpin("bhvtaptest", lonely.netns) is True
    assert enable_hairpin("bhvtaptest", lonely.netns) is False
