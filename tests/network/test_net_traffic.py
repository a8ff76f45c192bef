"""Real traffic through real namespaces: NAT, published ports, hairpin, isolation, DNS, VXLAN.

One site is built per module (it takes about a second): a fake internet with an HTTP server, two hosts
on it, compartments A and B on host 1, a compartment V spanning both hosts over VXLAN.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from nettopo import (
    ETH_P_ARP,
    INTERNET_GATEWAY,
    EchoHTTPServer,
    FrameInbox,
    Host,
    Internet,
    TcpListener,
    UdpInbox,
    arp_frame,
    http_get,
    new_token,
    nslookup,
    send_frame,
    sweep,
    tcp_connects,
    udp_frame,
    udp_send,
    wait_for,
)

from compute.network import (
    CompartmentNet,
    HostNetworkState,
    PortBinding,
    PortMapping,
    apply_host_network,
    attach_container,
    detach_container,
    mac_for,
    remove_host_network,
)
from compute.network.names import bridge_name_for, gateway_mac_for, host_veth_name_for
from compute.network.netns import iproute, run_in_netns

NEEDS_HOST = True
INTERNET = str(INTERNET_GATEWAY.ip)
A_WEB, A_API, B_DB = IPv4Address("10.80.1.2"), IPv4Address("10.80.1.3"), IPv4Address("10.80.2.2")
V_ONE, V_TWO = IPv4Address("10.80.9.2"), IPv4Address("10.80.9.3")
C_ISO = IPv4Address("10.80.3.2")
HOST_SERVICE_PORT = 2222
# The operator's infrastructure, reachable through the uplink like the internet: portal, database, broker.
INFRA_NETWORK = IPv4Network("198.51.100.0/24")
PORTAL, DATABASE, BROKER = "198.51.100.10", "198.51.100.11", "198.51.100.12"
METADATA = "169.254.169.254"
# An address the tenant was allowed to reach inside the protected range (a per-tenant exception).
ALLOWED_FOR_A = "198.51.100.20"
INFRA_PORTS = {PORTAL: 8000, DATABASE: 5432, BROKER: 6379, METADATA: 80, ALLOWED_FOR_A: 443}


def compartment(cid: str, subnet: str, names: dict[str, IPv4Address], **extra: object) -> CompartmentNet:
    network = IPv4Network(subnet)
    return CompartmentNet(
        compartment_id=cid,
        bridge=bridge_name_for(cid),
        subnet=network,
        gateway=network.network_address + 1,
        dns_names=names,
        **extra,  # type: ignore[arg-type]
    )


@dataclass
class Site:
    token: str
    internet: Internet
    host1: Host
    host2: Host
    a: CompartmentNet
    b: CompartmentNet
    c: CompartmentNet
    v_on_1: CompartmentNet
    v_on_2: CompartmentNet
    workloads: dict[str, str] = field(default_factory=dict)  # label -> netns name
    inboxes: dict[str, UdpInbox] = field(default_factory=dict)  # where a datagram may land -> its socket

    def ns(self, label: str) -> str:
        return self.workloads[label]


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    token = new_token()
    servers: list[EchoHTTPServer | TcpListener | UdpInbox] = []
    hosts: list[Host] = []
    site = None
    try:
        internet = Internet(token)
        host1, host2 = internet.add_host("1"), internet.add_host("2")
        hosts += [host1, host2]
        a = compartment(
            "cmpa",
            "10.80.1.0/24",
            {"web": A_WEB, "api": A_API},
            egress_allowed=[IPv4Network(f"{ALLOWED_FOR_A}/32")],
        )
        b = compartment("cmpb", "10.80.2.0/24", {"db": B_DB})
        c = compartment("cmpc", "10.80.3.0/24", {"iso": C_ISO}, nat=False)
        v_names = {"one": V_ONE, "two": V_TWO}
        v_on_1 = compartment("cmpv", "10.80.9.0/24", v_names, vni=4242, vxlan_peers=[host2.uplink_address.ip])
        v_on_2 = compartment("cmpv", "10.80.9.0/24", v_names, vni=4242, vxlan_peers=[host1.uplink_address.ip])
        ports = [
            PortMapping("tcp", 8080, A_WEB, 80),
            PortMapping("tcp", 8081, B_DB, 80),
            PortMapping("udp", 5353, A_WEB, 53),
        ]
        protected = [INFRA_NETWORK, IPv4Network(f"{host2.uplink_address.ip}/32")]
        members = (
            ("web", a, A_WEB, host1),
            ("api", a, A_API, host1),
            ("db", b, B_DB, host1),
            ("iso", c, C_ISO, host1),
            ("one", v_on_1, V_ONE, host1),
            ("two", v_on_2, V_TWO, host2),
        )
        bindings = {
            host.netns: [
                PortBinding(host_veth_name_for(f"bhtnw{label}{token}"), mac_for(label + token), address)
                for label, _comp, address, member_host in members
                if member_host is host
            ]
            for host in (host1, host2)
        }
        apply_host_network(
            HostNetworkState(
                "up0", [a, b, c, v_on_1], ports, protected=protected, bindings=bindings[host1.netns]
            ),
            host1.netns,
        )
        apply_host_network(HostNetworkState("up0", [v_on_2], bindings=bindings[host2.netns]), host2.netns)
        site = Site(token, internet, host1, host2, a, b, c, v_on_1, v_on_2)
        for label, comp, address, host in members:
            netns = f"bhtnw{label}{token}"
            attach_container(comp, netns, address, mac_for(label + token), host.netns)
            site.workloads[label] = netns
            servers.append(EchoHTTPServer(netns, "0.0.0.0", 80, label))
        servers.append(EchoHTTPServer(internet.netns, INTERNET, 80, "internet"))
        servers.append(TcpListener(host1.netns, "0.0.0.0", HOST_SERVICE_PORT))
        # The infrastructure and the metadata address live behind the internet's router.
        with iproute(internet.netns) as ipr:
            for address in INFRA_PORTS:
                ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=address, prefixlen=32)
        for address, port in INFRA_PORTS.items():
            servers.append(TcpListener(internet.netns, address, port))
            site.inboxes[address] = UdpInbox(internet.netns, address, port)
        site.inboxes["internet"] = UdpInbox(internet.netns, INTERNET, 5000)
        site.inboxes["internet-echo"] = UdpInbox(internet.netns, INTERNET, 5003, echo=True)
        site.inboxes["internet-vxlan"] = UdpInbox(internet.netns, INTERNET, 4789)
        site.inboxes["host1"] = UdpInbox(host1.netns, "0.0.0.0", 5001)
        site.inboxes["host2"] = UdpInbox(host2.netns, "0.0.0.0", 5002)
        servers.append(TcpListener(host2.netns, "0.0.0.0", HOST_SERVICE_PORT))
        servers += site.inboxes.values()
        # The internet knows a route to compartment A via host 1, as a hostile neighbour would.
        with iproute(internet.netns) as ipr:
            ipr.route("add", dst="10.80.1.0/24", gateway=str(host1.uplink_address.ip))
        yield site
        for label, netns in site.workloads.items():
            detach_container(netns, host2.netns if label == "two" else host1.netns)
        for host in hosts:
            remove_host_network(host.netns)
    finally:
        for server in servers:
            server.stop()
        sweep(token)


def test_it_masquerades_workload_traffic_to_the_internet(site: Site) -> None:
    assert http_get(site.ns("web"), INTERNET, 80) == f"internet {site.host1.uplink_address.ip}"


def test_it_publishes_a_port_to_the_internet_keeping_the_client_address(site: Site) -> None:
    assert http_get(site.internet.netns, str(site.host1.uplink_address.ip), 8080) == f"web {INTERNET}"
    assert http_get(site.internet.netns, str(site.host1.uplink_address.ip), 8081) == f"db {INTERNET}"


def test_it_hairpins_a_workload_to_its_own_published_port(site: Site) -> None:
    assert http_get(site.ns("web"), str(site.host1.uplink_address.ip), 8080) == f"web {site.a.gateway}"


def test_it_hairpins_a_neighbour_to_a_published_port(site: Site) -> None:
    assert http_get(site.ns("api"), str(site.host1.uplink_address.ip), 8080) == f"web {site.a.gateway}"


def test_it_lets_members_of_one_compartment_talk_directly(site: Site) -> None:
    assert http_get(site.ns("api"), str(A_WEB), 80) == f"web {A_API}"


def test_it_isolates_compartments_in_both_directions(site: Site) -> None:
    assert not tcp_connects(site.ns("web"), str(B_DB), 80)
    assert not tcp_connects(site.ns("db"), str(A_WEB), 80)
    assert not tcp_connects(site.ns("web"), str(V_ONE), 80)


def test_it_keeps_the_internet_out_of_unpublished_compartment_addresses(site: Site) -> None:
    assert not tcp_connects(site.internet.netns, str(A_WEB), 80)


def test_it_keeps_workloads_off_host_services(site: Site) -> None:
    host_addresses = [str(site.a.gateway), str(site.b.gateway), str(site.host1.uplink_address.ip)]
    # The service is really up: the internet reaches it on the uplink.
    assert tcp_connects(site.internet.netns, str(site.host1.uplink_address.ip), HOST_SERVICE_PORT)
    for address in host_addresses:
        assert not tcp_connects(site.ns("web"), address, HOST_SERVICE_PORT), address


def test_it_answers_dns_on_the_gateway_with_short_and_qualified_names(site: Site) -> None:
    web_ns = site.ns("web")
    assert nslookup(web_ns, "api", site.a.gateway) == [str(A_API)]
    assert nslookup(web_ns, "web.cmpa", site.a.gateway) == [str(A_WEB)]
    assert nslookup(web_ns, "db", site.a.gateway) == []
    assert nslookup(site.ns("db"), "db.cmpb", site.b.gateway) == [str(B_DB)]


def test_it_serves_dns_to_a_compartment_only_on_its_own_gateway(site: Site) -> None:
    assert tcp_connects(site.ns("web"), str(site.a.gateway), 53)
    assert not tcp_connects(site.ns("web"), str(site.b.gateway), 53)


def test_it_connects_a_compartment_across_two_hosts_over_vxlan(site: Site) -> None:
    assert wait_for(lambda: http_get(site.ns("one"), str(V_TWO), 80)) == f"two {V_ONE}"
    assert http_get(site.ns("two"), str(V_ONE), 80) == f"one {V_TWO}"
    assert nslookup(site.ns("two"), "one.cmpv", site.v_on_2.gateway) == [str(V_ONE)]


def test_it_sends_each_vxlan_member_out_through_its_own_host(site: Site) -> None:
    # Same gateway address and MAC on both hosts, yet each host answers only its own workloads.
    assert http_get(site.ns("one"), INTERNET, 80) == f"internet {site.host1.uplink_address.ip}"
    assert http_get(site.ns("two"), INTERNET, 80) == f"internet {site.host2.uplink_address.ip}"


def test_it_gives_a_compartment_without_nat_no_way_out(site: Site) -> None:
    assert not tcp_connects(site.ns("iso"), INTERNET, 80)
    assert nslookup(site.ns("iso"), "iso.cmpc", site.c.gateway) == [str(C_ISO)]


def test_it_sizes_vxlan_compartments_for_the_tunnel_overhead(site: Site) -> None:
    with iproute(site.ns("one")) as ipr:
        assert ipr.get_links(ifname="eth0")[0].get_attr("IFLA_MTU") == 1450
    with iproute(site.ns("web")) as ipr:
        assert ipr.get_links(ifname="eth0")[0].get_attr("IFLA_MTU") == 1500


# --- the workload as an attacker: nothing of the host or the infrastructure is reachable ------------


def test_it_keeps_workloads_off_the_portal_database_broker_and_metadata(site: Site) -> None:
    for address, port in INFRA_PORTS.items():
        if address == ALLOWED_FOR_A:
            continue
        # The service is really up: the internet side reaches it.
        assert tcp_connects(site.internet.netns, address, port), address
        assert not tcp_connects(site.ns("web"), address, port), address
        assert not tcp_connects(site.ns("iso"), address, port), address


def test_it_drops_udp_from_workloads_to_the_infrastructure(site: Site) -> None:
    for address, port in INFRA_PORTS.items():
        if address == ALLOWED_FOR_A:
            continue
        payload = f"probe {address}".encode()
        udp_send(site.ns("web"), address, port, payload)
        assert not site.inboxes[address].got(payload, timeout=0.3), address


def test_it_keeps_workloads_off_another_host_and_its_vxlan_port(site: Site) -> None:
    other_host = str(site.host2.uplink_address.ip)
    assert tcp_connects(site.internet.netns, other_host, HOST_SERVICE_PORT)
    assert not tcp_connects(site.ns("web"), other_host, HOST_SERVICE_PORT)
    udp_send(site.ns("web"), other_host, 5002, b"to host 2")
    assert not site.inboxes["host2"].got(b"to host 2", timeout=0.3)
    # A VXLAN frame forged by a workload never reaches the underlay, whatever address it is sent to.
    udp_send(site.ns("web"), INTERNET, 4789, b"forged vxlan")
    assert not site.inboxes["internet-vxlan"].got(b"forged vxlan", timeout=0.3)


def test_it_drops_udp_from_workloads_to_the_hosts_own_addresses(site: Site) -> None:
    udp_send(site.internet.netns, str(site.host1.uplink_address.ip), 5001, b"from outside")
    assert site.inboxes["host1"].got(b"from outside")
    for address in (str(site.a.gateway), str(site.b.gateway), str(site.host1.uplink_address.ip)):
        payload = f"from web to {address}".encode()
        udp_send(site.ns("web"), address, 5001, payload)
        assert not site.inboxes["host1"].got(payload, timeout=0.3), address


def test_it_still_lets_workloads_reach_the_internet_over_udp(site: Site) -> None:
    udp_send(site.ns("web"), INTERNET, 5000, b"hello internet")
    assert site.inboxes["internet"].got(b"hello internet")


def test_it_lets_a_tenant_reach_what_the_operator_allowed_it_and_no_one_else(site: Site) -> None:
    assert tcp_connects(site.ns("web"), ALLOWED_FOR_A, INFRA_PORTS[ALLOWED_FOR_A])
    assert not tcp_connects(site.ns("db"), ALLOWED_FOR_A, INFRA_PORTS[ALLOWED_FOR_A])


def test_it_never_lets_a_forged_source_address_leave_the_host(site: Site) -> None:
    web = site.ns("web")
    forged = {"another compartment": "10.80.2.77", "an outside address": "203.0.113.9"}
    with iproute(web) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        for address in forged.values():
            ipr.addr("add", index=eth0, address=address, prefixlen=32)
    try:
        for what, source in forged.items():
            payload = f"forged from {what}".encode()
            udp_send(web, INTERNET, 5000, payload, source=source)
            assert not site.inboxes["internet"].got(payload, timeout=0.3), what
        # The same socket call from the workload's own address does leave.
        udp_send(web, INTERNET, 5000, b"honest", source=str(A_WEB))
        assert site.inboxes["internet"].got(b"honest")
    finally:
        with iproute(web) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            for address in forged.values():
                ipr.addr("del", index=eth0, address=address, prefixlen=32)


# --- anti-spoofing per port: a workload's frames carry its own MAC and address, or go nowhere ------------

FORGED_MAC = "02:66:66:66:66:66"
NEIGHBOUR_PORT = 5004


def mac_of(site: Site, label: str) -> str:
    return mac_for(label + site.token)


def test_it_lets_a_workload_send_only_from_its_own_address_and_mac(site: Site) -> None:
    web, web_mac, api_mac = site.ns("web"), mac_of(site, "web"), mac_of(site, "api")
    gateway_mac = gateway_mac_for(site.a.compartment_id)
    internet = site.inboxes["internet"]
    neighbour = UdpInbox(site.ns("api"), "0.0.0.0", NEIGHBOUR_PORT)
    try:
        # Frames written by hand on the workload's own wire, as a root process in it can.
        attempts = {
            "a neighbour's address, to the internet": (web_mac, gateway_mac, A_API, INTERNET, internet),
            "an unused address of its compartment, to a neighbour": (
                web_mac,
                api_mac,
                "10.80.1.77",
                A_API,
                neighbour,
            ),
            "a neighbour's MAC and address, to the internet": (
                api_mac,
                gateway_mac,
                A_API,
                INTERNET,
                internet,
            ),
            "a forged MAC, to the internet": (FORGED_MAC, gateway_mac, A_WEB, INTERNET, internet),
            "a forged MAC, to a neighbour": (FORGED_MAC, api_mac, A_WEB, A_API, neighbour),
        }
        for what, (src_mac, dst_mac, src_ip, dst_ip, inbox) in attempts.items():
            payload = f"spoofed: {what}".encode()
            port = 5000 if inbox is internet else NEIGHBOUR_PORT
            send_frame(
                web, "eth0", udp_frame(src_mac, dst_mac, str(src_ip), str(dst_ip), 40000, port, payload)
            )
            assert not inbox.got(payload, timeout=0.3), what
        # The same frames with the workload's own MAC and address arrive: the attempts above could have.
        for dst_mac, dst_ip, port, inbox in (
            (gateway_mac, INTERNET, 5000, internet),
            (api_mac, str(A_API), NEIGHBOUR_PORT, neighbour),
        ):
            payload = f"honest to {dst_ip}".encode()
            send_frame(web, "eth0", udp_frame(web_mac, dst_mac, str(A_WEB), dst_ip, 40000, port, payload))
            assert inbox.got(payload), dst_ip
    finally:
        neighbour.stop()


def test_it_drops_arp_that_speaks_for_another_address_or_mac(site: Site) -> None:
    web, web_mac, api_mac = site.ns("web"), mac_of(site, "web"), mac_of(site, "api")
    heard = FrameInbox(site.ns("api"), "eth0", ETH_P_ARP)
    try:
        lies = {
            "the gateway's address (poisoning the neighbour)": arp_frame(
                web_mac, api_mac, web_mac, str(site.a.gateway), api_mac, str(A_API)
            ),
            "an unused address of its compartment": arp_frame(
                web_mac, api_mac, web_mac, "10.80.1.77", api_mac, str(A_API)
            ),
            "another MAC inside the ARP message": arp_frame(
                web_mac, api_mac, FORGED_MAC, str(A_WEB), api_mac, str(A_API)
            ),
            "another MAC on the frame": arp_frame(
                FORGED_MAC, api_mac, FORGED_MAC, str(A_WEB), api_mac, str(A_API)
            ),
        }
        for what, frame in lies.items():
            send_frame(web, "eth0", frame)
            assert not heard.got(frame, timeout=0.3), what
        honest = arp_frame(web_mac, api_mac, web_mac, str(A_WEB), api_mac, str(A_API))
        send_frame(web, "eth0", honest)
        assert heard.got(honest)
    finally:
        heard.stop()


def test_it_never_lets_a_workload_ride_a_neighbours_connection(site: Site) -> None:
    echo = site.inboxes["internet-echo"]

    def converse() -> tuple[int, bytes]:
        # The neighbour talks to the internet and gets its answer: conntrack holds the flow as established.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.bind((str(A_API), 0))
            sock.sendto(b"api asks", (INTERNET, 5003))
            return sock.getsockname()[1], sock.recv(2048)

    api_port, answer = run_in_netns(site.ns("api"), converse)
    assert answer == b"api asks"
    # The attacker next door sends into that flow: the neighbour's address and port, its own MAC.
    forged = udp_frame(
        mac_of(site, "web"),
        gateway_mac_for(site.a.compartment_id),
        str(A_API),
        INTERNET,
        api_port,
        5003,
        b"riding the neighbour's flow",
    )
    send_frame(site.ns("web"), "eth0", forged)
    assert not echo.got(b"riding the neighbour's flow", timeout=0.5)


def conntrack_entries(netns: str) -> list[str]:
    """The host's connection tracking table, one line per connection."""
    return run_in_netns(netns, lambda: Path("/proc/thread-self/net/nf_conntrack").read_text().splitlines())


def test_it_tracks_routed_connections_but_not_frames_bridged_inside_a_compartment(site: Site) -> None:
    assert http_get(site.ns("api"), str(A_WEB), 80) == f"web {A_API}"
    assert http_get(site.ns("web"), INTERNET, 80) == f"internet {site.host1.uplink_address.ip}"
    entries = conntrack_entries(site.host1.netns)
    # Conntrack is skipped for what the bridge carries (throughput); NAT and the policy need it for the rest.
    assert not [e for e in entries if f"src={A_API} dst={A_WEB} " in e and "dport=80 " in e]
    assert [e for e in entries if f"src={A_WEB} dst={INTERNET} " in e and "dport=80 " in e]
