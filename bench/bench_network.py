"""Network driver benchmark: prints one JSON line of figures and ratios against named baselines.

- throughput: iperf3 (-t 3, 3 interleaved rounds, medians) between two container namespaces on one
  compartment bridge, against a bare
  veth pair between two namespaces (goal: ratio >= 0.9);
- apply: time to apply 1,000 published ports on a host (goal: < 1 s), and an unchanged re-apply;
- egress policy: iperf3 from a workload through the NAT to the internet with the egress policy
  (protected networks, per-port MAC+address binding, VXLAN port closed) against the same rule set
  without those rules, and against session 11's policy (subnet anti-spoofing on every packet),
  interleaved in one run (goal: ratio >= 0.95);
- path cost: TCP connect latency from the fake internet through the DNAT to a workload with 10 and
  with 1,000 published ports (goal: equal within noise), plus iperf3 through the DNAT for both.

Everything runs in namespaces this script creates (prefix bhtnb) and removes, also after a failure.
Run as root: ``.venv/bin/python bench/bench_network.py``.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "network")]

from nettopo import INTERNET_SERVER, Internet, new_token, run_in_netns, sweep  # noqa: E402

from compute.network import (  # noqa: E402
    CompartmentNet,
    HostNetworkState,
    PortBinding,
    PortMapping,
    apply_host_network,
    attach_container,
    mac_for,
    nftables,
    remove_host_network,
)
from compute.network.names import bridge_name_for, host_veth_name_for  # noqa: E402
from compute.network.netns import ensure_netns, iproute, netns_path, ns_command  # noqa: E402

IPERF_SECONDS = 3
IPERF_ROUNDS = 3
EGRESS_ROUNDS = 9  # NAT throughput varies ~15 % run to run on the shared machine: more rounds
IPERF_PORT = 5201
CONNECT_SAMPLES = 1500
COMPARTMENT = CompartmentNet(
    compartment_id="bench",
    bridge=bridge_name_for("bench"),
    subnet=IPv4Network("10.90.0.0/16"),
    gateway=IPv4Address("10.90.0.1"),
)
SERVER_IP = IPv4Address("10.90.0.2")
CLIENT_IP = IPv4Address("10.90.0.3")
PUBLISHED_PORT = 30000


def iperf3(
    client_netns: str, server_netns: str, server_ip: str, port: int = IPERF_PORT, seconds: int = 3
) -> float:
    """Gbit/s received by an iperf3 server in `server_netns` from a client in `client_netns`."""
    server = subprocess.Popen(
        ns_command(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], server_netns),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            result = subprocess.run(
                ns_command(
                    ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(seconds), "-J"], client_netns
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            report = json.loads(result.stdout) if result.stdout.strip() else {}
            if result.returncode == 0 and "sum_received" in report.get("end", {}):
                return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
            if time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 failed: {report.get('error')} {result.stderr[-300:]}")
            time.sleep(0.05)  # the server is not listening yet
    finally:
        server.kill()
        server.wait()


def bare_veth_pair(token: str) -> tuple[str, str]:
    """Two namespaces joined by one veth pair: the baseline a compartment bridge is measured against."""
    left, right = f"bhtnbl{token}", f"bhtnbr{token}"
    ensure_netns(left)
    ensure_netns(right)
    with iproute(left) as ipr:
        ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns_path(right)})
    for netns, address in ((left, "10.91.0.1"), (right, "10.91.0.2")):
        with iproute(netns) as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address=address, prefixlen=24)
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return left, right


def accept_forever(netns: str, address: str, port: int) -> socket.socket:
    """A listener in `netns` that accepts and closes connections until its socket is closed."""

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(1024)
        return sock

    listener = run_in_netns(netns, listen)

    def loop() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.close()

    threading.Thread(target=loop, daemon=True).start()
    return listener


def connect_latency_us(netns: str, address: str, port: int, samples: int) -> dict[str, float]:
    """Median and p90 of TCP connect() time in microseconds, from `netns` to address:port."""

    def measure() -> list[float]:
        timings = []
        for _ in range(samples):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # RST on close: no TIME_WAIT pile-up, and the NAT entry's lifetime does not matter.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            started = time.perf_counter()
            sock.connect((address, port))
            timings.append((time.perf_counter() - started) * 1e6)
            sock.close()
        return timings

    timings = sorted(run_in_netns(netns, measure))
    return {"median": round(statistics.median(timings), 1), "p90": round(timings[int(len(timings) * 0.9)], 1)}


# A plausible operator's list: a few infrastructure subnets and hosts.
PROTECTED = [IPv4Network(f"172.16.{i}.0/24") for i in range(16)] + [
    IPv4Network(f"192.168.50.{i}/32") for i in range(1, 17)
]


def _is_rule_of(command: dict[str, object], family: str, chain: str) -> bool:
    rule = command.get("add", {}).get("rule", {})  # type: ignore[attr-defined]
    return bool(rule) and rule.get("family") == family and rule.get("chain") == chain


def _is_port_binding(command: dict[str, object]) -> bool:
    """The bridge table's per-port anti-spoofing: its rules and its chain."""
    chain = command.get("add", {}).get("chain", {})  # type: ignore[attr-defined]
    if chain and chain.get("family") == "bridge" and chain.get("name") == "prerouting":
        return True
    return _is_rule_of(command, "bridge", "prerouting")


def without_egress_policy(document: dict[str, object]) -> dict[str, object]:
    """`document` minus the egress policy's rules and the anti-spoofing: the rule set as it was before
    either existed."""

    def is_policy(command: dict[str, object]) -> bool:
        if _is_port_binding(command):
            return True
        text = json.dumps(command)
        if '"rule"' not in text:
            return False
        own_subnet_negated = '"@own_subnet"' in text and '"!="' in text
        protected = '"@protected"' in text or '"@never_reachable"' in text
        return protected or own_subnet_negated or '"right": 4789' in text

    commands = document["nftables"]
    assert isinstance(commands, list)
    return {"nftables": [c for c in commands if not is_policy(c)]}


def _is_bridge_object(command: dict[str, object], kind: str, name: str) -> bool:
    body = command.get("add", {}).get(kind, {})  # type: ignore[attr-defined]
    return bool(body) and body.get("family") == "bridge" and name in (body.get("name"), body.get("chain"))


def session11_policy(document: dict[str, object]) -> dict[str, object]:
    """`document` as session 11 built it: no per-port bindings, the subnet anti-spoofing check on every
    packet (before the conntrack shortcut), and bridged frames untracked by an interval lookup on the
    destination address in the inet table instead of a MAC lookup in the bridge table."""
    commands = [
        c
        for c in document["nftables"]  # type: ignore[attr-defined]
        if not _is_port_binding(c)
        and not _is_bridge_object(c, "chain", "prerouting_untracked")
        and not _is_bridge_object(c, "rule", "prerouting_untracked")
    ]
    for chain in ("forward", "input"):
        positions = [i for i, c in enumerate(commands) if _is_rule_of(c, "inet", chain)]
        spoof = next(i for i in positions if '"@own_subnet"' in json.dumps(commands[i]))
        # Session 11's order: anti-spoofing first, then established, same bridge, ...
        commands.insert(positions[0], commands.pop(spoof))
    key = {"concat": [{"meta": {"key": "iifname"}}, {"payload": {"protocol": "ip", "field": "daddr"}}]}
    untracked = [
        {"match": {"op": "==", "left": key, "right": "@own_subnet"}},
        {"match": {"op": "!=", "left": key, "right": "@gateways"}},
        {"notrack": None},
    ]
    inet = {"family": "inet", "table": "bulkhead"}
    chain = {**inet, "name": "prerouting_raw", "type": "filter", "hook": "prerouting", "prio": -300}
    commands.append({"add": {"chain": {**chain, "policy": "accept"}}})
    commands.append({"add": {"rule": {**inet, "chain": "prerouting_raw", "expr": untracked}}})
    return {"nftables": commands}


def ab_rounds(
    variants: dict[str, dict[str, object]], host_netns: str, client_ns: str, server_ns: str, server_ip: str
) -> dict[str, list[float]]:
    """iperf3 under each rule set in turn, EGRESS_ROUNDS times; the order rotates every round so that
    neither position nor the machine's drift favours one variant."""
    names = list(variants)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(EGRESS_ROUNDS):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            nftables.run_nft(variants[name], host_netns)
            runs[name].append(iperf3(client_ns, server_ns, server_ip, seconds=IPERF_SECONDS))
    return runs


def paired_ratio(variant: list[float], baseline: list[float]) -> float:
    """Median of the per-round ratios: each round's pair ran back to back under the same load."""
    return round(statistics.median(v / b for v, b in zip(variant, baseline, strict=True)), 3)


def workload_bindings(token: str) -> list[PortBinding]:
    """The bench's two workloads' ports, bound to their MACs and addresses."""
    return [
        PortBinding(host_veth_name_for(f"bhtnb{role}{token}"), mac_for(f"bench-{name}"), address)
        for role, name, address in (("s", "server", SERVER_IP), ("c", "client", CLIENT_IP))
    ]


def ports_state(count: int, bindings: list[PortBinding]) -> HostNetworkState:
    ports = [PortMapping("tcp", PUBLISHED_PORT, SERVER_IP, IPERF_PORT)]
    ports += [PortMapping("tcp", 40000 + i, SERVER_IP, 80) for i in range(count - 1)]
    return HostNetworkState("up0", [COMPARTMENT], ports, bindings=bindings)


def main() -> None:
    token = new_token()
    figures: dict[str, object] = {}
    listener = None
    try:
        internet = Internet(token)
        host = internet.add_host("b")
        uplink = str(host.uplink_address.ip)
        bindings = workload_bindings(token)

        # --- apply cost -------------------------------------------------------------------------
        started = time.perf_counter()
        apply_host_network(HostNetworkState("up0", [COMPARTMENT], bindings=bindings), host.netns)
        figures["apply_first_compartment_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        apply_host_network(ports_state(1000, bindings), host.netns)
        figures["apply_1000_ports_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        report = apply_host_network(ports_state(1000, bindings), host.netns)
        figures["reapply_unchanged_1000_ports_s"] = round(time.perf_counter() - started, 3)
        assert report.unchanged, report
        figures["apply_goal_s"] = 1.0

        # --- throughput in one compartment vs a bare veth pair --------------------------------------
        server_ns, client_ns = f"bhtnbs{token}", f"bhtnbc{token}"
        attach_container(COMPARTMENT, server_ns, SERVER_IP, mac_for("bench-server"), host.netns)
        attach_container(COMPARTMENT, client_ns, CLIENT_IP, mac_for("bench-client"), host.netns)
        left, right = bare_veth_pair(token)
        bare_runs, compartment_runs = [], []
        for _ in range(IPERF_ROUNDS):  # interleaved: load from other processes hits both sides alike
            bare_runs.append(iperf3(left, right, "10.91.0.2", seconds=IPERF_SECONDS))
            compartment_runs.append(iperf3(client_ns, server_ns, str(SERVER_IP), seconds=IPERF_SECONDS))
        bare, compartment = statistics.median(bare_runs), statistics.median(compartment_runs)
        figures["iperf3_bare_veth_gbps"] = round(bare, 2)
        figures["iperf3_compartment_gbps"] = round(compartment, 2)
        figures["iperf3_runs_bare_gbps"] = [round(x, 2) for x in bare_runs]
        figures["iperf3_runs_compartment_gbps"] = [round(x, 2) for x in compartment_runs]
        figures["compartment_vs_bare_veth"] = round(compartment / bare, 3)
        figures["throughput_goal_ratio"] = 0.9

        # --- egress through the NAT with and without the egress policy -----------------------------
        policy_state = HostNetworkState("up0", [COMPARTMENT], protected=PROTECTED, bindings=bindings)
        with_policy = nftables.build_ruleset(policy_state)
        without_policy = without_egress_policy(with_policy)
        before = session11_policy(with_policy)
        figures["egress_policy_rules_removed_for_baseline"] = len(with_policy["nftables"]) - len(
            without_policy["nftables"]
        )
        variants = {"none": without_policy, "session11": before, "policy": with_policy}
        runs = ab_rounds(variants, host.netns, client_ns, internet.netns, str(INTERNET_SERVER))
        medians = {name: statistics.median(values) for name, values in runs.items()}
        figures["iperf3_egress_nat_no_policy_gbps"] = round(medians["none"], 2)
        figures["iperf3_egress_nat_session11_policy_gbps"] = round(medians["session11"], 2)
        figures["iperf3_egress_nat_with_policy_gbps"] = round(medians["policy"], 2)
        figures["iperf3_runs_egress_no_policy_gbps"] = [round(x, 2) for x in runs["none"]]
        figures["iperf3_runs_egress_session11_policy_gbps"] = [round(x, 2) for x in runs["session11"]]
        figures["iperf3_runs_egress_with_policy_gbps"] = [round(x, 2) for x in runs["policy"]]
        figures["egress_policy_vs_none"] = paired_ratio(runs["policy"], runs["none"])
        figures["egress_session11_policy_vs_none"] = paired_ratio(runs["session11"], runs["none"])
        # Inside one compartment (bridged, no NAT): the per-port binding is the only policy on the path.
        runs = ab_rounds(
            {"none": without_policy, "policy": with_policy}, host.netns, client_ns, server_ns, str(SERVER_IP)
        )
        figures["iperf3_runs_compartment_no_binding_gbps"] = [round(x, 2) for x in runs["none"]]
        figures["iperf3_runs_compartment_with_binding_gbps"] = [round(x, 2) for x in runs["policy"]]
        figures["compartment_binding_vs_none"] = paired_ratio(runs["policy"], runs["none"])
        figures["egress_policy_goal_ratio"] = 0.95

        # --- path cost through the DNAT with 10 vs 1000 published ports ----------------------------
        listener = accept_forever(server_ns, str(SERVER_IP), IPERF_PORT + 1)
        results = {}
        for count in (10, 1000, 10, 1000):  # interleaved, so drift over time hits both alike
            apply_host_network(
                HostNetworkState(
                    "up0",
                    [COMPARTMENT],
                    [
                        PortMapping("tcp", PUBLISHED_PORT + 1, SERVER_IP, IPERF_PORT + 1),
                        *list(ports_state(count, bindings).ports)[: count - 1],
                    ],
                    bindings=bindings,
                ),
                host.netns,
            )
            sample = connect_latency_us(internet.netns, uplink, PUBLISHED_PORT + 1, CONNECT_SAMPLES)
            results.setdefault(count, []).append(sample["median"])
        for count, medians in results.items():
            figures[f"dnat_connect_median_us_{count}_ports"] = round(statistics.mean(medians), 1)
        figures["dnat_connect_1000_vs_10"] = round(
            figures["dnat_connect_median_us_1000_ports"] / figures["dnat_connect_median_us_10_ports"],  # type: ignore[operator]
            3,
        )
        for count in (10, 1000):
            apply_host_network(ports_state(count, bindings), host.netns)
            figures[f"iperf3_through_dnat_gbps_{count}_ports"] = round(
                iperf3(internet.netns, server_ns, uplink, port=PUBLISHED_PORT, seconds=2), 2
            )
        remove_host_network(host.netns)
    finally:
        if listener is not None:
            listener.close()
        sweep(token)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
