"""Compartments end to end: API and services -> a real agent (Celery worker + loop) -> runc containers in
namespaces attached to compartment bridges of a host that lives in a network namespace.

The host is a namespace on a fake internet (nettopo); its row says so with the label `netns`, and the
agent applies the host's network there. Nothing leaves the test namespaces. Each container's netns is
named after its runtime id, so the test can also probe from exactly where the container sits.
"""

from __future__ import annotations

import fcntl
import json
import statistics
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nettopo import (
    INTERNET_GATEWAY,
    INTERNET_SERVER,
    EchoHTTPServer,
    Internet,
    TcpListener,
    UdpInbox,
    http_get,
    new_token,
    sweep,
    tcp_connects,
    udp_send,
)

from compute import services
from compute.compartments import Compartment, IPAllocation
from compute.host import network as host_network
from compute.host.context import host_context
from compute.models import Host, Workload
from compute.network import detach_container, nftables, remove_host_network
from compute.network.bridge import list_owned_links
from compute.network.names import BRIDGE_PREFIX
from compute.network.netns import iproute, netns_exists
from portal.models import Operation
from tenants.actors import Actor
from tests.compute.conftest import cleanup_host, finished, make_host, store_dir, workload_in  # noqa: F401
from tests.compute.runtimes import oci_runtime
from tests.conftest import World, client_for
from tests.imaging.images import (
    BUSYBOX,
    Entry,
    build_image,
    make_layer,
    post_archive,
    run_inline,
    write_oci_archive,
)
from tests.processes import host_agent, wait_until

NEEDS_HOST = True
pytestmark = pytest.mark.django_db(transaction=True)

INTERNET = str(INTERNET_SERVER)
APPLETS = (
    "sh",
    "echo",
    "cat",
    "mkdir",
    "sleep",
    "seq",
    "sed",
    "printf",
    "nslookup",
    "httpd",
    "nc",
    "ip",
    "tail",
)
WEB_COMMAND = "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 80 -h /www"
# busybox-static's wget crashes without glibc's NSS libraries in the image: nslookup (its own resolver)
# finds the neighbour through the gateway's dnsmasq, nc talks HTTP to the address it found.
GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2"
CLIENT_COMMAND = (
    "nslookup web; "
    "ip=$(nslookup web | sed -n 's/^Address: \\([0-9.]*\\)$/\\1/p'); echo \"web is $ip\"; "
    f'for i in $(seq 100); do {GET} "$ip" 80 && break; sleep 0.1; done; '
    f"{GET} {INTERNET} 80; echo; echo client-done"
)


@dataclass
class Site:
    world: World
    host: Host
    host_netns: str
    uplink_ip: str
    internet_netns: str
    image: Any


def nettools_image(world: World, tmp_path: Path, persona: str, tenant: Any) -> Any:
    """A busybox image with the network applets, imported into `tenant` by `persona`."""
    base = {"bin/busybox": Entry(BUSYBOX.read_bytes(), mode=0o755)}
    base.update({f"bin/{applet}": Entry(symlink="busybox") for applet in APPLETS})
    archive = write_oci_archive(build_image([make_layer(base)]), tmp_path / f"net-{tenant.name}.tar")
    response = post_archive(client_for(world, persona), archive, name="nettools", tag="1", tenant=tenant)
    assert response.status_code == 202, response.json()  # type: ignore[attr-defined]
    assert run_inline(response.json()["id"]).state == "succeeded"  # type: ignore[attr-defined]
    from imaging.models import Image

    return Image.objects.get(tenant=tenant, name="nettools")


@pytest.fixture
def net_image(world: World, store_dir: Path, tmp_path: Path) -> Any:  # noqa: F811
    return nettools_image(world, tmp_path, "alice", world.acme)


def leftovers(host: Host, host_netns: str) -> list[str]:
    """Everything of Bulkhead's still on the host: bridges, nftables tables, dnsmasq, workload netns."""
    found = []
    with iproute(host_netns) as ipr:
        found += [f"bridge {name}" for name in list_owned_links(ipr, BRIDGE_PREFIX)]
    found += [f"nft {table}" for table in nftables.list_owned(host_netns)]
    state_dir = str(host_network.state_dir(host_context(host.pk)))
    ps = subprocess.run(["pgrep", "-af", "dnsmasq"], capture_output=True, text=True, check=False).stdout
    found += [f"dnsmasq {line}" for line in ps.splitlines() if state_dir in line]
    found += [f"netns {w.runtime_id}" for w in Workload.objects.all() if netns_exists(w.runtime_id)]
    return found


@contextmanager
def portal_host(
    internet: Internet, label: str, store: Path, *, resynced: bool = False, **env: str
) -> Iterator[tuple[Host, str]]:
    """A Bulkhead host living in a namespace on the fake internet, with its real agent; removed after.
    `resynced`: entered once the agent's re-sync at start is done (see `host_agent`)."""
    host_ns = internet.add_host(label)
    host = make_host(f"bht-net-{label}-{internet.token}")
    Host.objects.filter(pk=host.pk).update(
        labels={"netns": host_ns.netns, "uplink": "up0"}, address=str(host_ns.uplink_address.ip)
    )
    host.refresh_from_db()
    runtime_ids: list[str] = []
    try:
        with host_agent(host, resynced=resynced, BULKHEAD_STORE_DIR=str(store), **env):
            yield host, host_ns.netns
            runtime_ids = list(Workload.objects.filter(host=host).values_list("runtime_id", flat=True))
    finally:
        cleanup_host(host)
        for runtime_id in runtime_ids:
            detach_container(runtime_id, host_ns.netns)
        remove_host_network(host_ns.netns, state_dir=host_network.state_dir(host_context(host.pk)))


@pytest.fixture
def site(world: World, store_dir: Path, net_image: Any) -> Iterator[Site]:  # noqa: F811
    token = new_token()
    internet = Internet(token)
    servers: list[EchoHTTPServer] = []
    try:
        servers.append(EchoHTTPServer(internet.netns, INTERNET, 80, "internet"))
        # The operator protects the hosts' segment, where the portal, database and broker live.
        with portal_host(
            internet, "c", store_dir, BULKHEAD_PROTECTED_CIDRS=str(INTERNET_GATEWAY.network)
        ) as (host, host_netns):
            uplink_ip = host.address or ""
            yield Site(world, host, host_netns, uplink_ip, internet.netns, net_image)
    finally:
        for server in servers:
            server.stop()
        sweep(token)


def compartment(site: Site, name: str, persona: str = "amir", tenant: Any = None) -> Compartment:
    tenant = tenant or site.world.acme
    response = client_for(site.world, persona).post(
        "/api/v1/compartments/", {"tenant": str(tenant.pk), "name": name}, format="json"
    )
    assert response.status_code == 201, response.json()
    return Compartment.objects.get(pk=response.json()["id"])


def run(
    site: Site,
    name: str,
    command: str,
    joins: Compartment | None,
    host: Host | None = None,
    *,
    persona: str = "mia",
    image: Any = None,
) -> Workload:
    # Through the service (pinning to a host is an operator's choice the API checks first).
    image = image or site.image
    spec = services.WorkloadSpec(name=name, image=image, command=["/bin/sh", "-c", command], host=host)
    op = services.create_workload(
        actor=Actor(user=site.world.user(persona)),
        tenant=image.tenant,
        spec=spec,
        compartments=[joins] if joins else [],
    )
    assert finished(str(op.pk)).state == "succeeded", finished(str(op.pk)).error
    return Workload.objects.get(pk=op.target_id)


def address_of(workload: Workload) -> str:
    return IPAllocation.objects.get(workload=workload).address


def logs(site: Site, workload: Workload) -> str:
    response = client_for(site.world, "mia").get(f"/api/v1/workloads/{workload.pk}/logs/")
    return str(response.json()["logs"])


def test_a_container_reaches_the_internet_and_nothing_of_the_host_or_the_infrastructure(site: Site) -> None:
    # Stand-ins on the hosts' segment and behind the router: portal, PostgreSQL, Redis, metadata.
    portal = str(INTERNET_GATEWAY.ip)
    metadata = "169.254.169.254"
    with iproute(site.internet_netns) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=metadata, prefixlen=32)
    targets = [(portal, 8000), (portal, 5432), (portal, 6379), (metadata, 80)]
    listeners = [TcpListener(site.internet_netns, address, port) for address, port in targets]
    listeners.append(TcpListener(site.host_netns, "0.0.0.0", 2222))
    inboxes = {
        "broker": UdpInbox(site.internet_netns, portal, 6379),
        "host": UdpInbox(site.host_netns, "0.0.0.0", 5001),
        "internet": UdpInbox(site.internet_netns, str(INTERNET_SERVER), 5000),
    }
    try:
        probe = run(site, "probe", "exec sleep 300", compartment(site, "front"))
        workload_in("probe", {"running"})
        attacker = probe.runtime_id
        gateway = str(Compartment.objects.get(name="front", tenant=site.world.acme).gateway_address)
        for address, port in [*targets, (site.uplink_ip, 2222), (gateway, 2222)]:
            assert not tcp_connects(attacker, address, port, timeout=1.0), (address, port)
        for address, port in targets:
            assert tcp_connects(site.internet_netns, address, port), (address, port)
        udp_send(attacker, portal, 6379, b"SET pwned 1")
        udp_send(attacker, site.uplink_ip, 5001, b"to the host")
        udp_send(attacker, str(INTERNET_SERVER), 5000, b"hello internet")
        assert inboxes["internet"].got(b"hello internet")
        assert not inboxes["broker"].got(b"SET pwned 1", timeout=0.3)
        assert not inboxes["host"].got(b"to the host", timeout=0.3)
        assert http_get(attacker, INTERNET, 80) == f"internet {site.uplink_ip}"
        # A forged source address never leaves the host.
        with iproute(attacker) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address="203.0.113.9", prefixlen=32)
        udp_send(attacker, str(INTERNET_SERVER), 5000, b"forged", source="203.0.113.9")
        assert not inboxes["internet"].got(b"forged", timeout=0.3)
    finally:
        for listener in [*listeners, *inboxes.values()]:
            listener.stop()


def test_an_operator_opens_a_protected_service_to_one_tenant_and_no_other(site: Site, tmp_path: Path) -> None:
    # A service on the hosts' protected segment that acme's workloads need (a licence server, say).
    service = (str(INTERNET_GATEWAY.ip), 8443)
    metadata = ("169.254.169.254", 80)
    with iproute(site.internet_netns) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=metadata[0], prefixlen=32)
    host_service = (site.uplink_ip, 2222)
    listeners = [
        TcpListener(site.internet_netns, *service),
        TcpListener(site.internet_netns, *metadata),
        TcpListener(site.host_netns, "0.0.0.0", host_service[1]),
    ]
    try:
        acme_probe = run(site, "probe", "exec sleep 300", compartment(site, "front"))
        globex_image = nettools_image(site.world, tmp_path, "bob", site.world.globex)
        globex_net = compartment(site, "gx", persona="bob", tenant=site.world.globex)
        globex_probe = run(site, "gx", "exec sleep 300", globex_net, persona="bob", image=globex_image)
        workload_in("probe", {"running"})
        workload_in("gx", {"running"})
        for target in (service, metadata, host_service):
            assert tcp_connects(site.internet_netns, *target), target
        for probe in (acme_probe, globex_probe):
            assert not tcp_connects(probe.runtime_id, *service, timeout=1.0), probe.name

        url = f"/api/v1/tenants/{site.world.acme.pk}/egress-allowances/"
        # The tenant's owner cannot open it for herself.
        refused = client_for(site.world, "alice").post(url, {"network": f"{service[0]}/32"}, format="json")
        assert refused.status_code == 403
        allowed = client_for(site.world, "oscar").post(url, {"network": f"{service[0]}/32"}, format="json")
        assert allowed.status_code == 201, allowed.json()
        assert Operation.objects.filter(kind="tenant.egress_allow", queue=site.host.queue).exists()

        wait_until(
            lambda: tcp_connects(acme_probe.runtime_id, *service), timeout=30, what="acme reaches the service"
        )
        assert not tcp_connects(globex_probe.runtime_id, *service, timeout=1.0)
        # Link-local stays closed for the tenant that got an exception, and so does the host itself.
        for target in (metadata, host_service):
            assert not tcp_connects(acme_probe.runtime_id, *target, timeout=1.0), target

        revoked = client_for(site.world, "oscar").delete(f"/api/v1/egress-allowances/{allowed.json()['id']}/")
        assert revoked.status_code == 204
        wait_until(
            lambda: not tcp_connects(acme_probe.runtime_id, *service, timeout=1.0),
            timeout=30,
            what="the service closed to acme again",
        )
    finally:
        for listener in listeners:
            listener.stop()


def test_a_container_is_created_while_the_hosts_network_is_busy_and_runs_once_attached(site: Site) -> None:
    """The container is made (conmon, `runc create`) in its namespace while its compartment's network
    waits for the host's lock (held here, as another create realising its network holds it); its process
    starts only once the namespace is attached, and it answers on its compartment address."""
    front = compartment(site, "front")
    lock_path = host_network.state_dir(host_context(site.host.pk)) / "agent.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            spec = services.WorkloadSpec(
                name="web", image=site.image, command=["/bin/sh", "-c", WEB_COMMAND], host=None
            )
            op = services.create_workload(
                actor=Actor(user=site.world.user("mia")),
                tenant=site.world.acme,
                spec=spec,
                compartments=[front],
            )
            web = Workload.objects.get(pk=op.target_id)
            runtime = oci_runtime(site.host)
            wait_until(  # runc's "created": its init has a pid and waits for `start`
                lambda: runtime.state(web.runtime_id).pid is not None,
                timeout=60,
                what="the container made (not started) while its network waits",
            )
            assert Workload.objects.get(pk=web.pk).state == "creating"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert finished(str(op.pk)).state == "succeeded", finished(str(op.pk)).error
    assert workload_in("web", {"running"}).pk == web.pk
    assert wait_until(lambda: http_get(web.runtime_id, address_of(web), 80), timeout=10) == "hello-from-web\n"


def test_compartments_end_to_end(site: Site) -> None:
    front, back = compartment(site, "front"), compartment(site, "back")
    web = run(site, "web", WEB_COMMAND, front)
    assert workload_in("web", {"running"}).host_id == site.host.pk
    other = run(site, "other", "exec sleep 300", back)
    workload_in("other", {"running"})

    # Two containers of one compartment: the name resolves on the gateway, TCP by name works, and the
    # compartment's NAT takes the client out to the internet with the host's address.
    client = run(site, "client", CLIENT_COMMAND, front)
    workload_in("client", {"stopped", "failed"}, timeout=60)
    output = logs(site, client)
    assert f"Address: {address_of(web)}" in output or f"Address 1: {address_of(web)}" in output, output
    assert "hello-from-web" in output, output
    assert f"internet {site.uplink_ip}" in output, output
    assert "client-done" in output, output

    # A container of compartment B cannot reach one of compartment A, in either direction.
    assert not tcp_connects(other.runtime_id, address_of(web), 80, timeout=1.0)
    assert not tcp_connects(web.runtime_id, address_of(other), 80, timeout=1.0)
    assert http_get(web.runtime_id, INTERNET, 80) == f"internet {site.uplink_ip}"

    # A published port is reachable from the internet on the host's uplink.
    mia = client_for(site.world, "mia")
    published = mia.post(
        "/api/v1/published-ports/", {"workload": str(web.pk), "workload_port": 80}, format="json"
    )
    assert published.status_code == 201, published.json()
    assert finished(published.json()["operation"]["id"]).state == "succeeded"
    host_port = published.json()["host_port"]
    assert host_port == 20000
    assert http_get(site.internet_netns, site.uplink_ip, host_port) == "hello-from-web\n"

    # Bad input is a clear 4xx and changes nothing on the host.
    rules_before = nftables.list_owned(site.host_netns)
    again = mia.post(
        "/api/v1/published-ports/",
        {"workload": str(web.pk), "workload_port": 80, "host_port": host_port},
        format="json",
    )
    assert again.status_code == 409 and "already published" in again.json()["error"]["message"]
    outside = mia.post(
        "/api/v1/published-ports/",
        {"workload": str(web.pk), "workload_port": 80, "host_port": 8080},
        format="json",
    )
    assert outside.status_code == 400
    overlapping = client_for(site.world, "amir").post(
        "/api/v1/compartments/",
        {"name": "clash", "subnet": front.subnet, "tenant": str(site.world.acme.pk)},
        format="json",
    )
    assert overlapping.status_code == 409
    assert nftables.list_owned(site.host_netns) == rules_before
    in_use = client_for(site.world, "amir").delete(f"/api/v1/compartments/{front.pk}/")
    assert in_use.status_code == 409

    # Unpublish, delete everything: the host is left with nothing of Bulkhead's.
    assert finished(mia.delete(f"/api/v1/published-ports/{published.json()['id']}/").json()["id"]).state == (
        "succeeded"
    )
    assert http_get(site.internet_netns, site.uplink_ip, host_port, timeout=1.0) is None
    # A workload without a compartment, for comparison: a private netns with only loopback.
    plain = run(site, "plain", "exit 0", None)
    assert not IPAllocation.objects.filter(workload=plain).exists()
    runtime_ids = [w.runtime_id for w in (web, other, client, plain)]
    for workload in (web, other):
        # PID 1 of these ignores SIGTERM: no point waiting the default 10 s grace.
        stop = mia.post(f"/api/v1/workloads/{workload.pk}/stop/", {"grace_seconds": 0}, format="json")
        assert finished(stop.json()["id"]).state == "succeeded"
    for workload in (web, other, client, plain):
        assert finished(mia.delete(f"/api/v1/workloads/{workload.pk}/").json()["id"]).state == "succeeded"
    wait_until(lambda: not Workload.objects.exists(), timeout=30, what="workloads gone")
    assert leftovers(site.host, site.host_netns) == []
    assert [r for r in runtime_ids if netns_exists(r)] == []
    for item in (front, back):
        assert client_for(site.world, "amir").delete(f"/api/v1/compartments/{item.pk}/").status_code == 204
    print(json.dumps(operation_timings(plain)))  # figures for bench/README-network.md (run with -s)


def operation_timings(plain: Workload) -> dict[str, float]:
    """Median seconds from claim to finish per operation kind (creation includes attach + apply)."""
    durations: dict[str, list[float]] = {}
    for op in Operation.objects.exclude(started_at=None).exclude(finished_at=None):
        kind = f"{op.kind} (no compartment)" if op.target_id == str(plain.pk) else op.kind
        durations.setdefault(kind, []).append((op.finished_at - op.started_at).total_seconds())
    return {kind: round(statistics.median(values), 3) for kind, values in sorted(durations.items())}


def test_the_agent_repairs_a_network_changed_from_outside_and_says_so(site: Site) -> None:
    from compute.host.agent_loop import repair_network
    from tenants.models import AuditEntry

    front = compartment(site, "front")
    run(site, "sleeper", "exec sleep 300", front)
    assert repair_network(host_context(site.host.pk)) == []  # nothing to repair: re-applying changes nothing
    for table in nftables.list_owned(site.host_netns):
        subprocess.run(
            ["ip", "netns", "exec", site.host_netns, "nft", "delete", "table", *table.split()], check=True
        )
    assert not nftables.list_owned(site.host_netns)
    repaired = repair_network(host_context(site.host.pk))
    assert repaired
    assert nftables.list_owned(site.host_netns)
    entry = AuditEntry.objects.get(action="host.network.repaired")
    assert entry.details["repaired"] == repaired


def test_a_repair_of_a_managed_network_is_drift_of_its_tenant(site: Site) -> None:
    """Adopt the resources with a document, break the host's rules and bridge, see the reconciler say so."""
    from compute.compartments import NetworkRepair
    from compute.desired import reconciler
    from compute.desired import services as desired
    from compute.desired import tasks as desired_tasks
    from compute.desired.models import DesiredState
    from compute.host.agent_loop import repair_network
    from tenants.models import AuditEntry

    front = compartment(site, "front")
    run(site, "sleeper", "exec sleep 300", front)
    alice = Actor(user=site.world.user("alice"))
    revision, _ = desired.save_revision(
        actor=alice, tenant=site.world.acme, text=desired.export_for(site.world.acme)
    )
    plan = desired.create_plan(actor=alice, tenant=site.world.acme, revision=revision)
    op = desired.apply_plan(actor=alice, plan=plan)
    desired_tasks.apply_plan.apply(args=[str(op.pk)])
    assert finished(str(op.pk)).state == "succeeded", finished(str(op.pk)).error
    desired.set_mode(actor=alice, tenant=site.world.acme, mode="monitor")
    reconciler.reconcile_tenant(site.world.acme.pk)
    assert DesiredState.objects.get(tenant=site.world.acme).condition("Drifted")["status"] == "False"  # type: ignore[index]

    subprocess.run(
        ["ip", "netns", "exec", site.host_netns, "nft", "delete", "table", "inet", "bulkhead"], check=True
    )
    subprocess.run(["ip", "-n", site.host_netns, "link", "delete", front.bridge], check=True)
    assert repair_network(host_context(site.host.pk))
    reconciler.reconcile_tenant(site.world.acme.pk)

    state = DesiredState.objects.get(tenant=site.world.acme)
    drifted = state.condition("Drifted")
    assert drifted is not None and drifted["status"] == "True"
    assert drifted["message"] == "network/front repaired"
    (item,) = state.drift
    assert item["kind"] == "repaired" and item["resource_kind"] == "network"
    restored = {change["before"] for change in item["changes"]}
    assert any(line.startswith(f"bridge {front.bridge}: ") for line in restored), restored
    assert any(line.startswith("nftables: ") for line in restored), restored
    assert state.resource_conditions["network/front"]["Drifted"] == "True"
    assert state.condition("Ready")["reason"] == "Corrected"  # type: ignore[index]
    assert NetworkRepair.objects.filter(compartment=front, host=site.host).count() == 1
    entry = AuditEntry.objects.get(action="compartment.repaired")
    assert entry.tenant == site.world.acme and entry.details["host"] == site.host.name
    # The next run finds nothing new: the drift was reported once, not forever.
    reconciler.reconcile_tenant(site.world.acme.pk)
    assert DesiredState.objects.get(tenant=site.world.acme).condition("Drifted")["status"] == "False"  # type: ignore[index]


def test_a_compartment_spans_two_hosts_through_the_portal(
    world: World,
    store_dir: Path,  # noqa: F811
    net_image: Any,
) -> None:
    """Two hosts, two agents, one compartment: a client on one finds and reaches a server on the other by
    name over VXLAN. The server's host learns of the client's host when the client is created (it is told
    at once): the agents' periodic re-apply is pushed out of the test's reach, so only that can work."""
    token = new_token()
    internet = Internet(token)
    no_rounds = {"BULKHEAD_NETWORK_REPAIR_SECONDS": "3600"}
    try:
        with (
            portal_host(internet, "e", store_dir, **no_rounds) as (first, _),
            portal_host(internet, "f", store_dir, **no_rounds) as (second, _),
        ):
            site = Site(world, first, "", "", internet.netns, net_image)
            span = compartment(site, "span")
            server = run(site, "web", WEB_COMMAND, span, host=first)
            client = run(
                site, "client", CLIENT_COMMAND.replace(f"{GET} {INTERNET} 80; ", ""), span, host=second
            )
            assert server.host == first and client.host == second
            output = wait_until(
                lambda: "client-done" in logs(site, client) and logs(site, client), timeout=60, what="client"
            )
            assert f"web is {address_of(server)}" in output
            assert "hello-from-web" in output, output
            assert Operation.objects.filter(kind="compartment.sync", queue=first.queue).exists()
    finally:
        sweep(token)


def test_a_compartment_member_made_ahead_and_deleted_before_its_claim_leaves_nothing(
    world: World,
    store_dir: Path,  # noqa: F811
    net_image: Any,
) -> None:
    """The host creates a compartment member from its create's message (container in its namespace,
    namespace attached to the bridge) while the claim is held back (`create.claiming`); the workload is
    deleted meanwhile: no container, namespace or veth of it stays on the host."""
    from compute.network.bridge import link_by_name
    from compute.network.names import host_veth_name_for

    token = new_token()
    internet = Internet(token)
    try:
        # resynced: the create is the worker's (the loop's re-sync at start would take a pending one over).
        with portal_host(
            internet, "h", store_dir, resynced=True, BULKHEAD_PAUSEPOINT="create.claiming:4"
        ) as (
            host,
            host_netns,
        ):
            site = Site(world, host, host_netns, host.address or "", internet.netns, net_image)
            front = compartment(site, "front")
            mia = Actor(user=world.user("mia"))
            spec = services.WorkloadSpec(name="web", image=net_image, command=["/bin/sh", "-c", WEB_COMMAND])
            create_op = services.create_workload(
                actor=mia, tenant=world.acme, spec=spec, compartments=[front]
            )
            web = Workload.objects.get(pk=create_op.target_id)
            runtime = oci_runtime(host)
            wait_until(
                lambda: runtime.state(web.runtime_id).pid is not None and netns_exists(web.runtime_id),
                timeout=30,
                what="the member made ahead of its claim",
            )
            assert Workload.objects.get(pk=web.pk).state == "pending"  # its claim is held back
            delete_op = services.delete_workload(actor=mia, workload=web)
            assert finished(str(delete_op.pk)).state == "succeeded", finished(str(delete_op.pk)).error
            finished(str(create_op.pk))  # it ends (whichever way), it does not hang
            wait_until(lambda: not Workload.objects.filter(pk=web.pk).exists(), timeout=30, what="gone")
            assert runtime.list_ids() == []
            assert not netns_exists(web.runtime_id)
            with iproute(host_netns) as ipr:
                assert link_by_name(ipr, host_veth_name_for(web.runtime_id)) is None
    finally:
        sweep(token)
