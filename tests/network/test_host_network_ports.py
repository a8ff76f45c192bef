"""The host's network as its agent applies it (compute.host.network) on a real (namespaced) host: a
container's published port is realised only once the container's address answers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address
from types import SimpleNamespace
from typing import Any

import pytest
from nettopo import Host

from compute.host import network
from compute.network import detach_container, mac_for, nftables
from compute.network.bridge import link_by_name
from compute.network.names import bridge_name_for
from compute.network.netns import ensure_netns, iproute, netns_exists

NEEDS_HOST = True
COMPARTMENT = "cmpports"
WEB_ADDRESS = IPv4Address("10.81.1.2")
DB_ADDRESS = IPv4Address("10.81.1.3")
HOST_PORT = 24917
IFF_LOWER_UP = 0x10000  # carrier: the veth's other end is up


class ServedLink:
    """The portal's side as the agent's link sees it: the network state it serves, facts it is told."""

    def __init__(self, served: dict[str, Any]) -> None:
        self.served = served

    def network_state(self) -> dict[str, Any]:
        return self.served

    def report_facts(self, facts: dict[str, Any]) -> None:
        pass


def served_state(token: str, *, port_to: IPv4Address | None) -> dict[str, Any]:
    members = {"web": WEB_ADDRESS, "db": DB_ADDRESS}
    return {
        "uplink": "up0",
        "compartments": [
            {
                "compartment_id": COMPARTMENT,
                "bridge": bridge_name_for(COMPARTMENT),
                "subnet": "10.81.1.0/24",
                "gateway": "10.81.1.1",
                "nat": True,
                "vni": None,
                "vxlan_peers": [],
                "dns_names": {name: str(address) for name, address in members.items()},
                "dns_upstreams": [],
                "egress_allowed": [],
            }
        ],
        "ports": (
            [{"protocol": "tcp", "host_port": HOST_PORT, "address": str(port_to), "workload_port": 8080}]
            if port_to
            else []
        ),
        "protected": [],
        "bindings": [
            {
                "workload": str(uuid.uuid5(uuid.NAMESPACE_OID, name)),
                "runtime_id": runtime_id(token, name),
                "isolation": "namespace",
                "mac": mac_for(name),
                "address": str(address),
            }
            for name, address in members.items()
        ],
    }


def runtime_id(token: str, name: str) -> str:
    return f"bhtnw{name}{token}"  # the test prefix: nettopo's sweep removes a namespace left behind


def container(token: str, name: str, address: IPv4Address) -> Any:
    """The part of a workload's spec the network needs."""
    return SimpleNamespace(
        runtime_id=runtime_id(token, name),
        network=SimpleNamespace(compartment=COMPARTMENT, address=address, mac=mac_for(name)),
    )


@pytest.fixture
def agent(lonely: Host) -> Iterator[Any]:
    """An agent's context for the `lonely` host (its network in the host's namespace)."""
    token = lonely.netns.removeprefix("bhtnl")
    profile = SimpleNamespace(
        id=uuid.uuid4(), name="bht-ports", netns=lonely.netns, uplink="up0", networks=[], network_enabled=True
    )
    ctx = SimpleNamespace(
        profile=profile,
        link=ServedLink(served_state(token, port_to=WEB_ADDRESS)),
        forget_profile=lambda: None,
        token=token,
    )
    try:
        yield ctx
    finally:
        for name in ("web", "db"):
            detach_container(runtime_id(token, name), lonely.netns)
        network.remove_host(ctx)  # type: ignore[arg-type]


def published_ports(netns: str) -> str:
    """The published-port map's elements as the kernel has them (JSON text)."""
    for item in nftables.list_owned(netns).get("inet bulkhead", []):
        if item.get("map", {}).get("name") == "published_addrs":
            return json.dumps(item["map"].get("elem", []))
    return ""


def port_published(netns: str) -> bool:
    elements = published_ports(netns)
    return str(HOST_PORT) in elements and str(WEB_ADDRESS) in elements


def test_it_leaves_out_the_port_of_a_container_not_attached_yet(agent: Any) -> None:
    # The port's own operation applies the host before its container's create attached it: a DNAT to an
    # address nobody answers would swallow the first SYN of a client, who then waits a second.
    network.apply_host(agent)

    assert not port_published(agent.profile.netns)


def test_it_publishes_the_port_as_its_container_is_attached(agent: Any) -> None:
    web = container(agent.token, "web", WEB_ADDRESS)

    network.ensure_container_network(agent, web)

    assert port_published(agent.profile.netns)
    with iproute(runtime_id(agent.token, "web")) as ipr:
        eth0 = link_by_name(ipr, "eth0")
        assert eth0 is not None and eth0["flags"] & IFF_LOWER_UP


def test_it_publishes_the_port_of_the_first_container_of_a_compartment_with_one_load(
    agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bridge is made alone, the container attached, then one apply loads the rules with its port
    # (two loads took 45-50 ms more on a create's path).
    loads: list[str | None] = []
    real_run_nft = nftables.run_nft

    def run_nft(document: nftables.Json, host_netns: str | None = None) -> None:
        loads.append(host_netns)  # the real load, counted
        real_run_nft(document, host_netns)

    monkeypatch.setattr(nftables, "run_nft", run_nft)

    network.ensure_container_network(agent, container(agent.token, "web", WEB_ADDRESS))

    assert loads == [agent.profile.netns]
    assert port_published(agent.profile.netns)


def test_it_publishes_the_port_of_a_container_attached_to_an_existing_bridge(agent: Any) -> None:
    # The db's create made the bridge; the web's attaches first and applies once, with its port.
    network.ensure_container_network(agent, container(agent.token, "db", DB_ADDRESS))
    assert not port_published(agent.profile.netns)

    network.ensure_container_network(agent, container(agent.token, "web", WEB_ADDRESS))

    assert port_published(agent.profile.netns)


def test_it_attaches_a_member_being_created_with_the_first_of_its_compartment(agent: Any) -> None:
    # The web's create made its namespace ahead (its container is made there meanwhile) but its network
    # step waits for the host's lock, which the db's holds: the db attaches the web too. Else the db
    # could run and call the web at an address nobody answers yet: that SYN is lost for a second.
    ensure_netns(runtime_id(agent.token, "web"))

    network.ensure_container_network(agent, container(agent.token, "db", DB_ADDRESS))

    with iproute(runtime_id(agent.token, "web")) as ipr:
        eth0 = link_by_name(ipr, "eth0")
        assert eth0 is not None and eth0["flags"] & IFF_LOWER_UP
        assert (str(WEB_ADDRESS), 24) in [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr()]
    assert port_published(agent.profile.netns)  # the web's port, now that its address answers
    # The web's own step later finds it attached and changes nothing of it.
    network.ensure_container_network(agent, container(agent.token, "web", WEB_ADDRESS))
    assert port_published(agent.profile.netns)


def test_it_leaves_alone_a_member_whose_create_has_not_made_its_namespace(agent: Any) -> None:
    network.ensure_container_network(agent, container(agent.token, "db", DB_ADDRESS))

    assert not netns_exists(runtime_id(agent.token, "web"))
    assert not port_published(agent.profile.netns)


def test_it_withdraws_the_port_when_its_container_leaves(agent: Any) -> None:
    web = container(agent.token, "web", WEB_ADDRESS)
    network.ensure_container_network(agent, web)

    detach_container(web.runtime_id, agent.profile.netns)
    network.apply_host(agent)

    assert not port_published(agent.profile.netns)
