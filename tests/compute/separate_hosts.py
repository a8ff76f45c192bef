"""Hosts that are really separate from the portal, for tests: each one a machine of its own on one box.

A `SeparatePortal` is the portal's side as deployed: a real daphne, the portal's Celery worker (and beat
when asked) on the real Redis, listening on a test bridge (`bhsep<token>`, 198.19.N.1/24) besides the
test's loopback. Each `SeparateHost` is a network namespace on that bridge (198.19.N.1x/24) and a mount
namespace of its own, started by exactly the `make agent PORTAL=… JOIN_TOKEN=…` the portal's API
answered the operator (split into an argument list, never run through a shell). What the host machine has:

- its own data directory (state, layer store: empty at start) outside the portal's, given as
  BULKHEAD_DATA_DIR, the one setting the machine itself chooses;
- the portal's data directory (this checkout's var/) covered by an empty tmpfs, with only what the host's
  own `make setup` would have left there (the guest, read-only; the set-up stamp): see
  separate_host_launcher.py;
- the portal's HTTP port and the broker's port, and nothing else of the portal's machine: nftables in the
  host's namespace drop every other packet to the portal's address, and the portal's loopback (where
  PostgreSQL and Redis listen) is another namespace's. Redis is reached through a forwarder on the bridge.

`allow_database` (ALLOW_DATABASE, off) is the one switch for a database route: off, there is no
forwarder to PostgreSQL and no firewall opening, and `assert_no_route_to_database` holds on every host.

Everything carries the test's token and goes away at the end, also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from django.conf import settings

from compute.models import Host, Workload
from tests.processes import ROOT, celery_beat, celery_worker, process, test_database_url, wait_until

# Hosts get no route to the database: the agent reads and writes no row (issue 16).
ALLOW_DATABASE = False

PORTAL_DATA = ROOT / "var"
HOSTS_ROOT = Path("/var/tmp")  # not pytest's root-only tmp: QEMU reads the hosts' root disks as its own user


@dataclass
class SeparateHost:
    name: str
    netns: str
    address: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    row: Host
    killed_at: float | None = None

    def inside(self, argv: list[str]) -> list[str]:
        """`argv` run in the host's network and mount namespaces (it sees the host's var/agent.env)."""
        return ["nsenter", f"--target={self.proc.pid}", "--net", "--mount", f"--wd={ROOT}", "--", *argv]

    def probe(self, *args: str) -> Any:
        """separate_host_probe.py's answer, asked from inside the host."""
        argv = self.inside([sys.executable, "-m", "tests.compute.separate_host_probe", *args])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_bare_env())
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def processes(self) -> list[int]:
        """Every process this host's `make agent` started (make, the join, the supervisor, worker, agent)."""
        return [self.proc.pid, *descendants(self.proc.pid)] if self.proc.poll() is None else []

    def kill(self) -> float:
        """SIGKILL every process of the host at once, as if its machine lost power (the workloads it
        started under conmon keep running, as on a machine cut off the network). Returns when (monotonic)."""
        for _ in range(3):  # a process forking while we kill: collect again
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.killed_at = time.monotonic()
        return self.killed_at

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class SeparatePortal:
    token: str
    bridge: str
    address: str  # the portal's address on the bridge
    http_port: int
    redis_port: int
    pg_port: int
    allow_database: bool
    oscar_token: str
    hosts: list[SeparateHost] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    def join_command(self, host_name: str, **profile: Any) -> list[str]:
        """The operator asks the portal's API for a join token and copies the command it answers."""
        response = httpx.post(
            f"{self.url}/api/v1/hosts/join-tokens/",
            json={"host_name": host_name, **profile},
            headers={"Authorization": f"Bearer {self.oscar_token}"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        argv = shlex.split(response.json()["command"])
        # Exactly `make agent PORTAL=<this portal> JOIN_TOKEN=<token>`: nothing else runs.
        assert argv[:2] == ["make", "agent"] and len(argv) == 4, argv
        assert argv[2] == f"PORTAL={self.url}" and argv[3].startswith("JOIN_TOKEN=bhj_"), argv
        return argv

    def assert_no_route_to_database(self, host: SeparateHost) -> None:
        for address in (self.address, "127.0.0.1"):
            assert host.probe("connect", address, str(self.pg_port)) != "open", address

    @contextlib.contextmanager
    def host(self, name: str, *, answering: bool = True, **profile: Any) -> Iterator[SeparateHost]:
        """A host machine joined by the command the UI shows; its agent answering when this yields
        (`answering=False`: as soon as the join is recorded)."""
        index = len(self.hosts) + 1
        netns = f"bhsep-{self.token}-{index}"
        address = f"{self.address.rsplit('.', 1)[0]}.{10 + index}"
        veth = f"vbs{self.token}{index}"
        data_dir = HOSTS_ROOT / f"bulkhead-sep-{self.token}" / name
        log_path = ROOT / "var" / f"test-sep-{self.token}-{name}.log"
        argv = self.join_command(name, domain_type_override="qemu", **profile)
        proc: subprocess.Popen[bytes] | None = None
        row: Host | None = None
        try:
            _run(["ip", "netns", "add", netns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
            _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", netns, "link", "set", "lo", "up"])
            self._firewall(netns)
            data_dir.mkdir(parents=True, mode=0o755)
            data_dir.parent.chmod(0o755)
            launcher = [
                "nsenter", f"--net=/run/netns/{netns}", "--",
                "unshare", "--mount", "--propagation", "private", "--",
                sys.executable, "-m", "tests.compute.separate_host_launcher",
                "--portal-data", str(PORTAL_DATA), "--staging", str(data_dir / ".machine-guest"), "--",
                *argv,
            ]  # fmt: skip
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    launcher, cwd=ROOT, env=_bare_env(BULKHEAD_DATA_DIR=str(data_dir)), stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            started = proc

            def joined_and_answering() -> Host | None:
                assert started.poll() is None, log_path.read_text(errors="replace")[-3000:]
                found = Host.objects.filter(name=name).first()
                return found if found and (not answering or _agent_answering(found)) else None

            row = wait_until(joined_and_answering, timeout=120, what=f"host {name} to join and answer")
            # `make agent` redid no set-up step (system, venv, native, guest): its first command is the join.
            first_line = log_path.read_text(errors="replace").splitlines()[0]
            assert first_line.startswith(".venv/bin/python -m compute.join --portal"), first_line
            host = SeparateHost(name, netns, address, data_dir, proc, log_path, row)
            self.hosts.append(host)
            if not self.allow_database:
                self.assert_no_route_to_database(host)
            yield host
        finally:
            if proc is not None and proc.poll() is None:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=10)
            _remove_host(netns, data_dir, row)

    def _firewall(self, netns: str) -> None:
        ports = [self.http_port, self.redis_port] + ([self.pg_port] if self.allow_database else [])
        rules = f"""
table inet bhsep_host {{
  chain output {{
    type filter hook output priority 0; policy accept;
    ct state established,related accept
    ip daddr {self.address} tcp dport {{ {", ".join(str(p) for p in ports)} }} accept
    ip daddr {self.address} drop
  }}
}}
"""
        subprocess.run(
            ["nsenter", f"--net=/run/netns/{netns}", "nft", "-f", "-"], input=rules.encode(), check=True
        )


@contextlib.contextmanager
def separate_portal(
    store_dir: Path,
    world: Any,
    *,
    allow_database: bool = ALLOW_DATABASE,
    beat: bool = False,
    **portal_env: str,
) -> Iterator[SeparatePortal]:
    """The portal's processes, reachable from the hosts' namespaces over a test bridge."""
    from compute.runtimes.libvirtd import ensure_libvirtd
    from tenants import services
    from tenants.actors import Actor

    ensure_libvirtd()  # the machine's libvirtd, in its own namespaces: a host never starts one
    # `make agent` sets a host up first; here (as after `make setup`, which `make test` runs) that is done.
    done = subprocess.run(["make", "-q", "system", "venv", "native", "guest"], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, "make agent would set this checkout up again: run `make setup` first"
    token = secrets.token_hex(3)
    bridge = f"bhsep{token}"
    address = f"198.19.{_free_octet()}.1"
    redis = urlparse(settings.REDIS_URL)
    database = urlparse(test_database_url())
    redis_port, pg_port = redis.port or 6379, database.port or 5432
    oscar = Actor(user=world.user("oscar"))
    _, oscar_token = services.create_token(actor=oscar, name=f"sep-{token}")
    with contextlib.ExitStack() as stack:
        _run(["ip", "link", "add", bridge, "type", "bridge"])
        stack.callback(_run, ["ip", "link", "del", bridge], check=False)
        _run(["ip", "addr", "add", f"{address}/24", "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])
        stack.enter_context(forwarding(address, redis_port))
        agent_urls = {"BULKHEAD_AGENT_REDIS_URL": redis._replace(netloc=_netloc(redis, address)).geturl()}
        if allow_database:
            stack.enter_context(forwarding(address, pg_port))
            agent_urls["BULKHEAD_AGENT_DATABASE_URL"] = database._replace(
                netloc=_netloc(database, address)
            ).geturl()
        http_port = _free_port(address)
        env = {
            "BULKHEAD_STORE_DIR": str(store_dir),
            "BULKHEAD_ALLOWED_HOSTS": f"{address},127.0.0.1,localhost",
            **agent_urls,
            **portal_env,
        }
        argv = ["-m", "daphne", "-b", address, "-p", str(http_port), "portal.asgi:application"]
        stack.enter_context(process(argv, f"test-sep-{token}-web.log", **env))
        wait_until(
            lambda: _answers(f"http://{address}:{http_port}/v2/"), timeout=60, what="the portal's daphne"
        )
        stack.enter_context(celery_worker("default", name=f"sep-{token}", **env))
        if beat:
            stack.enter_context(celery_beat(name=f"sep-{token}", **env))
        yield SeparatePortal(
            token, bridge, address, http_port, redis_port, pg_port, allow_database, oscar_token
        )


@contextlib.contextmanager
def forwarding(address: str, port: int) -> Iterator[None]:
    """A TCP forwarder from `address`:`port` (the bridge) to 127.0.0.1:`port` (where the service listens)."""
    listener = socket.create_server((address, port))
    listener.settimeout(0.2)
    stopping = threading.Event()
    # Closed at the end: a host cut off the network never closes its side (the database would keep them).
    connections: list[socket.socket] = []

    def pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", port))
            except OSError:
                client.close()
                continue
            connections.extend((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        listener.close()
        thread.join(timeout=5)
        for connection in connections:
            connection.close()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _remove_host(netns: str, data_dir: Path, row: Host | None) -> None:
    """Everything the host left: its processes (conmon, dnsmasq), containers, VMs, namespace, files."""
    from dataclasses import replace

    from compute.host.config import local
    from compute.host.context import HostContext
    from compute.host.drivers.container import oci_runtime
    from compute.runtimes.libvirt import domain_name

    if Path(f"/run/netns/{netns}").exists():
        inode = os.stat(f"/run/netns/{netns}").st_ino
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError):
                if entry.name.isdigit() and os.stat(entry / "ns" / "net").st_ino == inode:
                    os.kill(int(entry.name), signal.SIGKILL)
    if row is not None:
        with _data_dir(data_dir):
            # The host's own state: its runtime's root under the host's data directory, not the portal's.
            runtime = oci_runtime(HostContext(str(row.pk), replace(local(), data_dir=data_dir)))
            for runtime_id in runtime.list_ids():
                with contextlib.suppress(Exception):
                    runtime.delete(runtime_id)
        for workload in Workload.objects.filter(isolation="microvm"):
            for verb in ("destroy", "undefine"):
                subprocess.run(
                    ["virsh", "-q", "-c", "qemu:///system", verb, domain_name(workload.pk)],
                    capture_output=True,
                )
        for workload in Workload.objects.all():
            leftover = Path("/run/netns") / workload.runtime_id
            if workload.runtime_id and leftover.exists() and not os.path.ismount(leftover):
                leftover.unlink(missing_ok=True)
    _run(["ip", "netns", "del", netns], check=False)
    shutil.rmtree(data_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        data_dir.parent.rmdir()


@contextlib.contextmanager
def _data_dir(path: Path) -> Iterator[None]:
    """The settings a host's own processes had (their state is under their data directory)."""
    saved = settings.DATA_DIR
    settings.DATA_DIR = path
    try:
        yield
    finally:
        settings.DATA_DIR = saved


def _agent_answering(host: Host) -> bool:
    from compute import host_rpc

    return host.state == "ready" and host_rpc.is_answering(host.pk)


def _bare_env(**extra: str) -> dict[str, str]:
    """A machine's environment: no DATABASE_URL, REDIS_URL or any portal setting (the join brings them)."""
    keep = ("PATH", "HOME", "LANG", "TERM", "PYTHONDONTWRITEBYTECODE")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, **extra}


def _netloc(url: Any, host: str) -> str:
    credentials = url.netloc.rpartition("@")[0]
    return f"{credentials}@{host}:{url.port}" if credentials else f"{host}:{url.port}"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.TransportError:
        return False


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _free_octet() -> int:
    """A 198.19.N.0/24 (benchmarking range) that no interface of this machine uses yet."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for _ in range(100):
        octet = uuid.uuid4().int % 250 + 1
        if f" 198.19.{octet}." not in used:
            return octet
    raise AssertionError("no free 198.19.N.0/24")


def _run(argv: list[str], check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True)
