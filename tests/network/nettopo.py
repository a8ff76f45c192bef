"""Test topologies made of network namespaces: a fake internet, hosts, workloads. Nothing leaves them.

Every namespace, state directory and process created here carries the prefix `PREFIX`, so `sweep()`
can remove leftovers of an interrupted run before and after the tests.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from pyroute2 import IPRoute

from compute.network import dns
from compute.network.netns import delete_netns, ensure_netns, iproute, netns_path, ns_command, run_in_netns

PREFIX = "bhtn"
NETNS_DIR = Path("/run/netns")
# The fake internet: 198.18.0.0/15 is reserved for benchmarking and never routed on the real internet.
INTERNET_GATEWAY = IPv4Interface("198.18.0.1/24")
# A server "far away" on the internet, beyond the hosts' own segment (which workloads may not reach).
INTERNET_SERVER = IPv4Address("198.19.0.1")


def new_token() -> str:
    """A short random suffix so parallel or repeated runs never share names."""
    return secrets.token_hex(3)


def wait_for(condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> object:
    """Poll `condition` until it returns something truthy; fail with AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


class EchoHTTPServer:
    """An http.server inside a namespace that answers ``<label> <client ip>`` to every GET."""

    def __init__(self, netns: str, address: str, port: int, label: str) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"{label} {self.client_address[0]}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        # The listening socket is created inside the namespace and stays there for its whole life.
        self.server = run_in_netns(netns, lambda: http.server.ThreadingHTTPServer((address, port), Handler))
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class TcpListener:
    """A bare listening TCP socket in a namespace (a stand-in for a host service such as sshd)."""

    def __init__(self, netns: str, address: str, port: int) -> None:
        def listen() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(16)
            return sock

        self.sock = run_in_netns(netns, listen)

    def stop(self) -> None:
        self.sock.close()


class UdpInbox:
    """A UDP socket in a namespace that keeps what it receives (to prove a datagram did or did not arrive).

    With `echo` it also sends every datagram back to its sender (a conversation conntrack calls
    established)."""

    def __init__(self, netns: str, address: str, port: int, echo: bool = False) -> None:
        self.echo = echo

        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, port))
            sock.settimeout(0.05)
            return sock

        self.sock = run_in_netns(netns, bind)
        self.received: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while self.running:
            try:
                payload, sender = self.sock.recvfrom(2048)
                self.received.append(payload)
                if self.echo:
                    self.sock.sendto(payload, sender)
            except TimeoutError:
                continue
            except OSError:
                return

    def got(self, payload: bytes, timeout: float = 1.0) -> bool:
        """True once `payload` arrived, False if it did not within `timeout`."""
        deadline = time.monotonic() + timeout
        while payload not in self.received:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
        self.sock.close()


def udp_send(netns: str, host: str, port: int, payload: bytes, source: str | None = None) -> None:
    """Send one datagram from inside `netns` (from `source` when given: a forged address the sender owns)."""

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if source is not None:
                sock.bind((source, 0))
            with contextlib.suppress(OSError):
                sock.sendto(payload, (host, port))

    run_in_netns(netns, send)


# --- raw frames: what a hostile workload can put on its own wire without any help from its kernel ------

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(
    src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes
) -> bytes:
    """An Ethernet frame carrying one UDP datagram, every field as given (UDP checksum 0: none)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0x1234,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src_ip),
        socket.inet_aton(dst_ip),
    )
    header = header[:10] + struct.pack("!H", _ipv4_checksum(header)) + header[12:]
    return _mac_bytes(dst_mac) + _mac_bytes(src_mac) + struct.pack("!H", ETH_P_IP) + header + udp


def arp_frame(
    src_mac: str, dst_mac: str, sender_mac: str, sender_ip: str, target_mac: str, target_ip: str, op: int = 2
) -> bytes:
    """An Ethernet frame carrying one ARP message (op 1 request, 2 reply), every field as given."""
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op)
    arp += _mac_bytes(sender_mac) + socket.inet_aton(sender_ip)
    arp += _mac_bytes(target_mac) + socket.inet_aton(target_ip)
    return _mac_bytes(dst_mac) + _mac_bytes(src_mac) + struct.pack("!H", ETH_P_ARP) + arp


def send_frame(netns: str, ifname: str, frame: bytes) -> None:
    """Put `frame` on `ifname` inside `netns` as it is (a packet socket: no routing, no checks)."""

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((ifname, 0))
            sock.send(frame)

    run_in_netns(netns, send)


class FrameInbox:
    """Keeps every frame of `ethertype` that arrives on `ifname` inside `netns` (a packet socket)."""

    def __init__(self, netns: str, ifname: str, ethertype: int) -> None:
        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
            sock.bind((ifname, ethertype))
            sock.settimeout(0.05)
            return sock

        self.sock = run_in_netns(netns, bind)
        self.received: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while self.running:
            try:
                self.received.append(self.sock.recv(4096))
            except TimeoutError:
                continue
            except OSError:
                return

    def got(self, needle: bytes, timeout: float = 1.0) -> bool:
        """True once a frame containing `needle` arrived, False if none did within `timeout`."""
        deadline = time.monotonic() + timeout
        while not any(needle in frame for frame in list(self.received)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
        self.sock.close()


def http_get(netns: str, host: str, port: int, timeout: float = 2.0) -> str | None:
    """GET / from inside `netns`; the body, or None when the connection fails or times out."""

    def fetch() -> str | None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            connection.request("GET", "/")
            return connection.getresponse().read().decode()
        except OSError:
            return None
        finally:
            connection.close()

    return run_in_netns(netns, fetch)


def tcp_connects(netns: str, host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection from `netns` to host:port is accepted within `timeout`."""

    def connect() -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    return run_in_netns(netns, connect)


def nslookup(netns: str, name: str, server: IPv4Address) -> list[str]:
    """Addresses busybox nslookup gets for `name` from `server`, run inside `netns` (A records only)."""
    result = subprocess.run(
        ns_command(["busybox", "nslookup", "-type=a", name, str(server)], netns),
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    # The first "Address:" line names the server itself; the answers follow a "Name:" line.
    answer = result.stdout.split("Name:", 1)[1] if "Name:" in result.stdout else ""
    return re.findall(r"Address:\s*([0-9.]+)\s*$", answer, flags=re.MULTILINE)


def _link(ipr: IPRoute, name: str) -> int:
    return ipr.link_lookup(ifname=name)[0]


class Internet:
    """The fake internet: a namespace with one switch (a bridge) that host uplinks plug into."""

    def __init__(self, token: str) -> None:
        self.netns = f"{PREFIX}i{token}"
        self.token = token
        self.next_host = 2
        ensure_netns(self.netns)
        with iproute(self.netns) as ipr:
            ipr.link("set", index=_link(ipr, "lo"), state="up")
            ipr.link("add", ifname="wan", kind="bridge")
            index = _link(ipr, "wan")
            ipr.addr("add", index=index, address=str(INTERNET_GATEWAY.ip), prefixlen=24)
            ipr.link("set", index=index, state="up")
            ipr.addr("add", index=_link(ipr, "lo"), address=str(INTERNET_SERVER), prefixlen=32)

    def add_host(self, label: str, uplink_mtu: int = 1500) -> Host:
        """A new "host" namespace whose uplink ``up0`` sits on the internet switch; default route to it."""
        address = IPv4Interface(f"{INTERNET_GATEWAY.network.network_address + self.next_host}/24")
        self.next_host += 1
        host = Host(f"{PREFIX}h{label}{self.token}", address)
        ensure_netns(host.netns)
        outer = f"{PREFIX}{label}{self.token}"[:15]
        with iproute(self.netns) as ipr:
            ipr.link(
                "add",
                ifname=outer,
                kind="veth",
                mtu=uplink_mtu,
                peer={"ifname": "up0", "net_ns_fd": netns_path(host.netns)},
            )
            ipr.link("set", index=_link(ipr, outer), master=_link(ipr, "wan"), state="up")
        with iproute(host.netns) as ipr:
            ipr.link("set", index=_link(ipr, "lo"), state="up")
            index = _link(ipr, "up0")
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=24)
            ipr.link("set", index=index, mtu=uplink_mtu, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(INTERNET_GATEWAY.ip))
        return host

    def remove(self) -> None:
        delete_netns(self.netns)


class Host:
    """A namespace that plays one Bulkhead host."""

    def __init__(self, netns: str, uplink_address: IPv4Interface) -> None:
        self.netns = netns
        self.uplink_address = uplink_address


def lonely_host(token: str) -> Host:
    """A host namespace with an unconnected uplink and no internet: enough to apply state, no traffic."""
    host = Host(f"{PREFIX}l{token}", IPv4Interface("198.18.7.2/24"))
    ensure_netns(host.netns)
    with iproute(host.netns) as ipr:
        ipr.link("set", index=_link(ipr, "lo"), state="up")
        # A veth whose peer stays in the namespace: this kernel has no dummy driver.
        ipr.link("add", ifname="up0", kind="veth", peer="up0peer")
        ipr.link("set", index=_link(ipr, "up0peer"), state="up")
        index = _link(ipr, "up0")
        ipr.addr("add", index=index, address="198.18.7.2", prefixlen=24)
        ipr.link("set", index=index, state="up")
    return host


def _pattern(token: str) -> str:
    return f"{PREFIX}*{token}*" if token else f"{PREFIX}*"


def leftovers(token: str = "") -> list[str]:
    """Everything with the test prefix (and `token`) still on the machine: namespaces, state dirs."""
    found = [f"netns {p.name}" for p in NETNS_DIR.glob(_pattern(token))] if NETNS_DIR.exists() else []
    found += [f"state {p}" for p in dns.DEFAULT_STATE_ROOT.glob(_pattern(token))]
    found += [f"dnsmasq {pid}" for pid in _our_dnsmasq_pids(token)]
    return found


def _our_dnsmasq_pids(token: str = "") -> list[int]:
    pids = []
    marker = f"--conf-file={dns.DEFAULT_STATE_ROOT}/{PREFIX}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if marker in cmdline and token.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.append(int(proc.name))
    return pids


def sweep(token: str = "") -> None:
    """Remove every test namespace, dnsmasq and state directory with the prefix (and `token`)."""
    for pid in _our_dnsmasq_pids(token):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for path in dns.DEFAULT_STATE_ROOT.glob(_pattern(token)):
        shutil.rmtree(path, ignore_errors=True)
    if NETNS_DIR.exists():
        for path in NETNS_DIR.glob(_pattern(token)):
            delete_netns(path.name)
