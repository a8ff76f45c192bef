"""Bulkhead's nftables rules, built as JSON documents and loaded with ``nft -j -f -`` in one transaction.

Bulkhead owns two tables on a host and nothing else: ``inet bulkhead`` (filtering, NAT, published ports)
and ``bridge bulkhead`` (binds each workload port to its workload's MAC and address, and keeps an
anycast gateway's frames off VXLAN links). Every apply replaces both
whole in one transaction (add, delete, add), so the kernel never sees a half-built rule set and nothing
stale survives. Everything variable lives in sets and maps: a thousand published ports are one map
lookup, not a thousand rules.

No rule is ever built from text: values go into JSON as data, and were validated before (names.py,
spec.py), so a name such as ``"a;b"`` has no syntax to escape into.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable
from ipaddress import IPv4Network, collapse_addresses
from typing import Any

from compute.network.names import (
    HOST_VETH_PREFIX,
    VXLAN_PREFIX,
    gateway_mac_for,
    validate_ifname,
    vxlan_name_for,
)
from compute.network.netns import ns_command
from compute.network.spec import VXLAN_PORT, HostNetworkState

# Never reachable from a workload, whatever the operator configured: the metadata-service range.
ALWAYS_PROTECTED = (IPv4Network("169.254.0.0/16"),)
TABLE = "bulkhead"
INET = "inet"
BRIDGE = "bridge"
OWNED_TABLES = ((INET, TABLE), (BRIDGE, TABLE))
NFT_TIMEOUT_S = 30

Json = dict[str, Any]


class NftError(RuntimeError):
    """nft refused a document or a listing failed."""


# --- small JSON expression builders ------------------------------------------------------------------


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _ct(key: str) -> Json:
    return {"ct": {"key": key}}


def _match(left: Any, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _concat(*items: Any) -> Json:
    return {"concat": list(items)}


def _prefix(network: Any) -> Json:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


ACCEPT: Json = {"accept": None}
DROP: Json = {"drop": None}
MASQUERADE: Json = {"masquerade": None}


class _TableBuilder:
    """Collects the objects of one table as ``add`` commands."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.commands: list[Json] = []

    def set(
        self, name: str, type_: str | list[str], elements: list[Any], flags: list[str] | None = None
    ) -> None:
        body: Json = {"family": self.family, "table": TABLE, "name": name, "type": type_}
        if flags:
            body["flags"] = flags
        if elements:
            body["elem"] = elements
        self.commands.append({"add": {"set": body}})

    def map(self, name: str, type_: list[str], map_type: str, elements: list[Any]) -> None:
        body: Json = {"family": self.family, "table": TABLE, "name": name, "type": type_, "map": map_type}
        if elements:
            body["elem"] = elements
        self.commands.append({"add": {"map": body}})

    def chain(self, name: str, type_: str, hook: str, prio: int) -> None:
        body = {
            "family": self.family,
            "table": TABLE,
            "name": name,
            "type": type_,
            "hook": hook,
            "prio": prio,
            "policy": "accept",
        }
        self.commands.append({"add": {"chain": body}})

    def rule(self, chain: str, *expr: Json) -> None:
        body = {"family": self.family, "table": TABLE, "chain": chain, "expr": list(expr)}
        self.commands.append({"add": {"rule": body}})


def _collapsed(networks: Iterable[IPv4Network]) -> list[IPv4Network]:
    """Overlapping or adjacent networks merged: an nft interval set refuses overlapping elements."""
    return list(collapse_addresses(networks))


def _published_lookup(map_name: str) -> Json:
    return {"map": {"key": _concat(_meta("l4proto"), _payload("th", "dport")), "data": f"@{map_name}"}}


def _inet_table(state: HostNetworkState) -> list[Json]:
    uplink = validate_ifname(state.uplink)
    compartments = list(state.compartments)
    bridges = [c.bridge for c in compartments]
    table = _TableBuilder(INET)

    table.set("bridges", "ifname", bridges)
    table.set("same_bridge", ["ifname", "ifname"], [_concat(b, b) for b in bridges])
    table.set("egress_bridges", "ifname", [c.bridge for c in compartments if c.nat])
    table.set("gateways", ["ifname", "ipv4_addr"], [_concat(c.bridge, str(c.gateway)) for c in compartments])
    table.set("compartment_subnets", "ipv4_addr", [_prefix(c.subnet) for c in compartments], ["interval"])
    table.set("nat_subnets", "ipv4_addr", [_prefix(c.subnet) for c in compartments if c.nat], ["interval"])
    table.set(
        "own_subnet",
        ["ifname", "ipv4_addr"],
        [_concat(c.bridge, _prefix(c.subnet)) for c in compartments],
        ["interval"],
    )
    table.set(
        "protected",
        "ipv4_addr",
        [_prefix(n) for n in _collapsed([*ALWAYS_PROTECTED, *state.protected])],
        ["interval"],
    )
    table.set("never_reachable", "ipv4_addr", [_prefix(n) for n in ALWAYS_PROTECTED], ["interval"])
    table.set(
        "egress_allowed",
        ["ifname", "ipv4_addr"],
        [_concat(c.bridge, _prefix(n)) for c in compartments for n in _collapsed(c.egress_allowed)],
        ["interval"],
    )
    vxlan_peers = sorted({str(peer) for c in compartments for peer in c.vxlan_peers})
    table.set("vxlan_peers", "ipv4_addr", vxlan_peers)
    # nft 1.0.6 (Debian 12) cannot declare a map with concatenated data ("ipv4_addr . inet_service") in
    # JSON, so destination address and port are two maps with the same key: still O(1) per connection.
    ports = sorted(state.ports, key=lambda p: (p.protocol, p.host_port))
    published_key = ["inet_proto", "inet_service"]
    table.map(
        "published_addrs",
        published_key,
        "ipv4_addr",
        [[_concat(p.protocol, p.host_port), str(p.dest_ip)] for p in ports],
    )
    table.map(
        "published_dports",
        published_key,
        "inet_service",
        [[_concat(p.protocol, p.host_port), p.dest_port] for p in ports],
    )

    from_bridge = _match(_meta("iifname"), "@bridges")
    to_bridge = _match(_meta("oifname"), "@bridges")
    tcp_or_udp = _match(_meta("l4proto"), {"set": ["tcp", "udp"]})
    ipv4 = _match(_meta("nfproto"), "ipv4")
    to_local_address = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    dnat_published = {
        "dnat": {
            "family": "ip",
            "addr": _published_lookup("published_addrs"),
            "port": _published_lookup("published_dports"),
        }
    }

    # Published ports: any packet to one of the host's own addresses on a published port, from the
    # outside, from a workload (hairpin) or from the host itself.
    table.chain("prerouting_nat", "nat", "prerouting", -100)
    table.rule("prerouting_nat", ipv4, tcp_or_udp, to_local_address, dnat_published)
    table.chain("output_nat", "nat", "output", -100)
    table.rule(
        "output_nat",
        ipv4,
        tcp_or_udp,
        _match(_payload("ip", "daddr"), {"prefix": {"addr": "127.0.0.0", "len": 8}}, "!="),
        to_local_address,
        dnat_published,
    )

    table.chain("postrouting_nat", "nat", "postrouting", 100)
    # Hairpin: a workload reaching a published port gets answers from the host, not straight from the
    # destination, or its TCP stack would drop them.
    table.rule(
        "postrouting_nat",
        _match(_ct("status"), "dnat", "in"),
        to_bridge,
        _match(_payload("ip", "saddr"), "@compartment_subnets"),
        MASQUERADE,
    )
    table.rule(
        "postrouting_nat",
        _match(_meta("oifname"), uplink),
        _match(_payload("ip", "saddr"), "@nat_subnets"),
        MASQUERADE,
    )

    # Anti-spoofing proper is per port, per frame, in the bridge table (`_bridge_table`): a frame from a
    # workload port with another source MAC or address never reaches conntrack, so it cannot ride a
    # neighbour's connection. A new connection from a compartment must also come from its own subnet
    # (what arrives over VXLAN from a peer host, or from a port the bridge table does not know).
    from_foreign_source = _match(_concat(_meta("iifname"), _payload("ip", "saddr")), "@own_subnet", "!=")
    table.chain("forward", "filter", "forward", 0)
    table.rule("forward", _match(_ct("state"), ["established", "related"], "in"), ACCEPT)
    # Frames bridged inside one compartment reach this hook when br_netfilter is loaded (untracked, so
    # never "established"): the bridge table checked each one already (a peer host did, for what comes
    # over VXLAN), let them be without a lookup.
    table.rule("forward", _match(_concat(_meta("iifname"), _meta("oifname")), "@same_bridge"), ACCEPT)
    table.rule("forward", from_bridge, ipv4, from_foreign_source, DROP)
    table.rule("forward", _match(_ct("status"), "dnat", "in"), to_bridge, ACCEPT)
    # The infrastructure (portal, database, broker, other hosts) is out of reach unless the operator
    # allowed a network to this compartment's tenant; link-local (metadata) and the underlay's VXLAN
    # port always are.
    table.rule("forward", from_bridge, _match(_payload("ip", "daddr"), "@never_reachable"), DROP)
    table.rule(
        "forward",
        from_bridge,
        _match(_payload("ip", "daddr"), "@protected"),
        _match(_concat(_meta("iifname"), _payload("ip", "daddr")), "@egress_allowed", "!="),
        DROP,
    )
    table.rule("forward", from_bridge, _match(_payload("udp", "dport"), VXLAN_PORT), DROP)
    table.rule(
        "forward",
        _match(_meta("iifname"), "@egress_bridges"),
        _match(_meta("oifname"), uplink),
        ipv4,
        ACCEPT,
    )
    # Everything else from or to a compartment: other compartments (of any tenant), other host networks,
    # unsolicited traffic from outside.
    table.rule("forward", from_bridge, DROP)
    table.rule("forward", to_bridge, DROP)

    table.chain("input", "filter", "input", 0)
    # DHCP first: a client asks from 0.0.0.0 before it has an address.
    table.rule("input", from_bridge, _match(_payload("udp", "dport"), 67), ACCEPT)
    table.rule("input", from_bridge, _match(_ct("state"), ["established", "related"], "in"), ACCEPT)
    table.rule("input", from_bridge, ipv4, from_foreign_source, DROP)
    at_own_gateway = _match(_concat(_meta("iifname"), _payload("ip", "daddr")), "@gateways")
    table.rule("input", at_own_gateway, tcp_or_udp, _match(_payload("th", "dport"), 53), ACCEPT)
    table.rule("input", at_own_gateway, _match(_payload("icmp", "type"), "echo-request"), ACCEPT)
    table.rule("input", from_bridge, DROP)
    if any(c.vni is not None for c in compartments):
        # Only known peers may inject frames into a compartment over VXLAN.
        table.rule(
            "input",
            _match(_payload("udp", "dport"), VXLAN_PORT),
            _match(_payload("ip", "saddr"), "@vxlan_peers", "!="),
            DROP,
        )
    return table.commands


def _bridge_table(state: HostNetworkState) -> list[Json]:
    spanning = [c for c in state.compartments if c.vni is not None]
    table = _TableBuilder(BRIDGE)
    bindings = sorted(state.bindings, key=lambda b: b.port)
    table.set(
        "port_ipv4",
        ["ifname", "ether_addr", "ipv4_addr"],
        [_concat(b.port, b.mac, str(b.address)) for b in bindings],
    )
    table.set(
        "port_arp",
        ["ifname", "ether_addr", "ether_addr", "ipv4_addr"],
        [_concat(b.port, b.mac, b.mac, str(b.address)) for b in bindings],
    )
    # Anti-spoofing, first thing a frame meets on the bridge (before br_netfilter hands it to conntrack
    # and the inet table): from a workload port, only IPv4 from its own MAC and address and ARP that
    # speaks for them (frame and ARP sender MAC, ARP sender address) pass. One hash lookup per frame;
    # anything else from a workload port (another address or MAC, IPv6, VLAN tags, other ethertypes, a
    # port without a binding) is dropped.
    table.chain("prerouting", "filter", "prerouting", -300)
    table.rule(
        "prerouting",
        _match(_concat(_meta("iifname"), _payload("ether", "saddr"), _payload("ip", "saddr")), "@port_ipv4"),
        ACCEPT,
    )
    table.rule(
        "prerouting",
        _match(
            _concat(
                _meta("iifname"),
                _payload("ether", "saddr"),
                _payload("arp", "saddr ether"),
                _payload("arp", "saddr ip"),
            ),
            "@port_arp",
        ),
        ACCEPT,
    )
    table.rule("prerouting", _match(_meta("iifname"), f"{HOST_VETH_PREFIX}*"), DROP)
    # br_netfilter (on by default wherever it is loaded) runs frames bridged inside a compartment
    # through conntrack and the inet hooks; they need neither. A frame not addressed to a gateway is
    # bridged, not routed: no conntrack for it (decided here by one hash lookup on the destination MAC,
    # rather than by an interval lookup on the destination address in the inet table, on every packet).
    table.set(
        "local_gateway_macs",
        "ether_addr",
        sorted({gateway_mac_for(c.compartment_id) for c in state.compartments}),
    )
    table.chain("prerouting_untracked", "filter", "prerouting", -200)
    # Frames of Bulkhead's ports only (workloads, VXLAN): other bridges on the host (docker0, virbr0)
    # keep their conntrack.
    for ports in (HOST_VETH_PREFIX, VXLAN_PREFIX):
        table.rule(
            "prerouting_untracked",
            _match(_meta("iifname"), f"{ports}*"),
            _match(_payload("ether", "type"), "ip"),
            _match(_payload("ether", "daddr"), "@local_gateway_macs", "!="),
            {"notrack": None},
        )
    table.set("vxlan_ports", "ifname", [vxlan_name_for(c.compartment_id) for c in spanning])
    table.set("gateway_macs", "ether_addr", [gateway_mac_for(c.compartment_id) for c in spanning])
    # Every host of a spanning compartment answers as the same gateway (same IP, same MAC); its frames
    # must stay local or hosts would see their own MAC arrive from the tunnel.
    from_gateway = _match(_payload("ether", "saddr"), "@gateway_macs")
    for chain, hook, direction in (
        ("input", "input", "iifname"),
        ("forward", "forward", "iifname"),
        ("forward", "forward", "oifname"),
        ("output", "output", "oifname"),
    ):
        if not any(c.get("add", {}).get("chain", {}).get("name") == chain for c in table.commands):
            table.chain(chain, "filter", hook, 0)
        table.rule(chain, _match(_meta(direction), "@vxlan_ports"), from_gateway, DROP)
    return table.commands


def _table_object(family: str) -> Json:
    return {"table": {"family": family, "name": TABLE}}


def build_ruleset(state: HostNetworkState) -> Json:
    """The nft JSON document that atomically replaces Bulkhead's tables with the ones `state` needs."""
    commands: list[Json] = []
    for family, _name in OWNED_TABLES:
        # "add" first so "delete" cannot fail on a host where the table is missing.
        commands += [{"add": _table_object(family)}, {"delete": _table_object(family)}]
    for family, _name in OWNED_TABLES:
        commands.append({"add": _table_object(family)})
    commands += _inet_table(state)
    commands += _bridge_table(state)
    return {"nftables": commands}


def removal_document() -> Json:
    """The nft JSON document that removes Bulkhead's tables (and only them), present or not."""
    commands: list[Json] = []
    for family, _name in OWNED_TABLES:
        commands += [{"add": _table_object(family)}, {"delete": _table_object(family)}]
    return {"nftables": commands}


def run_nft(document: Json, host_netns: str | None = None) -> None:
    """Load `document` with ``nft -j -f -`` inside `host_netns`: one kernel transaction, all or nothing."""
    result = subprocess.run(
        ns_command(["nft", "-j", "-f", "-"], host_netns),
        input=json.dumps(document).encode(),
        capture_output=True,
        timeout=NFT_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise NftError(f"nft rejected the rule set: {result.stderr.decode(errors='replace').strip()}")


def apply_ruleset(state: HostNetworkState, host_netns: str | None = None) -> None:
    """Replace Bulkhead's tables with the rules for `state` in one transaction."""
    run_nft(build_ruleset(state), host_netns)


def delete_tables(host_netns: str | None = None) -> None:
    """Remove Bulkhead's tables from `host_netns` (no error if they are absent)."""
    run_nft(removal_document(), host_netns)


def list_owned(host_netns: str | None = None) -> dict[str, list[Json]]:
    """Bulkhead's tables as the kernel has them now: "family name" -> the objects nft lists.

    Listings keep handles and element order: both are stable while nobody touches the tables, and a
    table recreated from outside, even identically, is worth replacing with Bulkhead's own.
    """
    result = subprocess.run(
        ns_command(["nft", "-j", "list", "ruleset"], host_netns),
        capture_output=True,
        timeout=NFT_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise NftError(f"nft list ruleset failed: {result.stderr.decode(errors='replace').strip()}")
    owned: dict[str, list[Json]] = {}
    for item in json.loads(result.stdout).get("nftables", []):
        (kind, body), *_ = item.items()
        if kind == "metainfo":
            continue
        family = body.get("family")
        table = body.get("name") if kind == "table" else body.get("table")
        if table == TABLE and (family, table) in OWNED_TABLES:
            owned.setdefault(f"{family} {table}", []).append(item)
    return owned


def fingerprint(value: Any) -> str:
    """A stable hash of a JSON-able value (the desired document or an observed listing)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
