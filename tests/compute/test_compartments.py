"""Compartments, address allocations and published ports: services and API, no host network touched.

The host side (bridges, namespaces, real traffic) is proven in tests/network/test_compartments_e2e.py.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address
from typing import Any

import pytest

from compute import network_services, services
from compute.compartments import Compartment, IPAllocation, PublishedPort
from compute.models import Host, Workload
from compute.network.names import host_veth_name_for
from compute.resolver import NameCache
from compute.runtimes.libvirt import tap_name
from portal.errors import Conflict, Invalid
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.compute.runtimes import host_network_state, workload_spec
from tests.conftest import World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def net_host(world: World) -> Host:
    """A host that realises compartments (nothing runs on it here: workloads are created stopped)."""
    return Host.objects.create(
        name="bht-net-unit",
        cpus=8,
        memory_mib=16384,
        facts={"oci_runtimes": ["runc"], "networks": ["192.0.2.0/24"]},
        labels={"network": "on", "uplink": "up0"},
    )


def new_workload(world: World, name: str, compartments: list[Compartment] | None = None) -> Workload:
    image = db_image(world.acme, f"img-{name}")
    spec = services.WorkloadSpec(name=name, image=image)  # type: ignore[arg-type]
    op = services.create_workload(
        actor=Actor(user=world.user("mia")),
        tenant=world.acme,
        spec=spec,
        start=False,
        compartments=compartments,
    )
    return Workload.objects.get(pk=op.target_id)


def post_compartment(world: World, persona: str = "amir", **body: Any) -> Any:
    body.setdefault("tenant", str(world.acme.pk))
    return client_for(world, persona).post("/api/v1/compartments/", body, format="json")


def post_port(world: World, workload: Workload, persona: str = "mia", **body: Any) -> Any:
    body = {"workload": str(workload.pk), "workload_port": 80, **body}
    return client_for(world, persona).post("/api/v1/published-ports/", body, format="json")


def test_it_carves_compartment_subnets_from_the_pool(world: World) -> None:
    first = post_compartment(world, name="front")
    second = post_compartment(world, name="back", nat=False)
    assert first.status_code == 201, first.json()
    assert (first.json()["subnet"], first.json()["gateway"]) == ("10.200.0.0/24", "10.200.0.1")
    assert (second.json()["subnet"], second.json()["nat"]) == ("10.200.1.0/24", False)
    assert first.json()["bridge"].startswith("bhb") and first.json()["vni"] != second.json()["vni"]
    assert Quota.objects.get(tenant=world.acme).used_compartments == 2
    assert AuditEntry.objects.filter(action="compartment.create", tenant=world.acme).count() == 2


def test_it_takes_a_given_subnet_and_keeps_the_pool_clear_of_it(world: World, settings: Any) -> None:
    settings.BULKHEAD_COMPARTMENT_POOL = "10.77.0.0/23"
    assert post_compartment(world, name="given", subnet="10.77.0.0/24").json()["subnet"] == "10.77.0.0/24"
    assert post_compartment(world, name="auto").json()["subnet"] == "10.77.1.0/24"
    exhausted = post_compartment(world, name="more")
    assert exhausted.status_code == 409 and "pool" in exhausted.json()["error"]["message"]


@pytest.mark.parametrize(
    ("subnet", "status", "says"),
    [
        ("10.0.0.300/24", 400, "not an IPv4 network"),
        ("10.9.9.1/24", 400, "host bits"),
        ("not-a-cidr", 400, "not an IPv4 network"),
        ("10.0.0.0/8", 400, "too large"),
        ("10.9.9.0/30", 400, "too small"),
        ("127.0.0.0/24", 400, "special-purpose"),
        ("10.200.0.128/25", 409, "overlaps compartment 'front'"),
        ("192.0.2.0/25", 400, "outside the compartment pools; choose one inside 10.200.0.0/16, 10.0.0.0/8"),
    ],
)
def test_it_refuses_a_bad_subnet_clearly_and_creates_nothing(
    world: World, net_host: Host, subnet: str, status: int, says: str
) -> None:
    assert post_compartment(world, name="front").status_code == 201
    response = post_compartment(world, name="bad", subnet=subnet)
    assert response.status_code == status, response.json()
    assert says in response.json()["error"]["message"]
    assert not Compartment.objects.filter(name="bad").exists()
    assert Quota.objects.get(tenant=world.acme).used_compartments == 1


def test_it_does_not_say_whose_subnet_another_tenant_uses(world: World) -> None:
    bob = post_compartment(world, "bob", tenant=str(world.globex.pk), name="secret", subnet="10.42.0.0/24")
    assert bob.status_code == 201
    response = post_compartment(world, name="mine", subnet="10.42.0.0/25")
    assert response.status_code == 409
    assert "secret" not in response.json()["error"]["message"]
    assert "10.42.0.0/24" not in response.json()["error"]["message"]
    assert "in use on this installation" in response.json()["error"]["message"]


def test_it_refuses_a_subnet_outside_the_operators_pools_naming_them(world: World, settings: Any) -> None:
    settings.BULKHEAD_COMPARTMENT_POOLS = "172.20.0.0/16"
    for subnet in ("10.0.0.0/8", "192.168.1.0/24", "10.1.0.0/24"):
        response = post_compartment(world, name="wide", subnet=subnet)
        assert response.status_code == 400, (subnet, response.json())
        assert "10.200.0.0/16, 172.20.0.0/16" in response.json()["error"]["message"]
    assert post_compartment(world, name="inside", subnet="172.20.5.0/24").status_code == 201
    assert list(Compartment.objects.values_list("name", flat=True)) == ["inside"]


def test_it_keeps_compartments_off_the_database_broker_and_protected_networks(
    world: World, net_host: Host, settings: Any
) -> None:
    settings.REDIS_URL = "redis://10.5.0.7:6379/0"
    settings.BULKHEAD_PROTECTED_CIDRS = "10.6.0.0/16"
    net_host.address = "10.7.0.9"
    net_host.save(update_fields=["address"])
    for subnet in ("10.5.0.0/24", "10.6.8.0/24", "10.7.0.0/24", "192.0.2.0/24"):
        response = post_compartment(world, name="grab", subnet=subnet)
        assert response.status_code in (400, 409), (subnet, response.json())
        message = response.json()["error"]["message"]
        assert "10.200.0.0/16" in message, message
        for secret in ("10.5.0.7", "10.6.0.0/16", "10.7.0.9"):
            assert secret not in message
    assert not Compartment.objects.filter(name="grab").exists()
    assert AuditEntry.objects.filter(action="compartment.create").count() == 0


def test_it_sends_the_protected_networks_to_the_host(world: World, net_host: Host, settings: Any) -> None:
    settings.REDIS_URL = "redis://10.5.0.7:6379/0"
    settings.BULKHEAD_PROTECTED_CIDRS = "10.6.0.0/16, 198.51.100.0/24"
    net_host.address = "10.7.0.9"
    net_host.save(update_fields=["address"])
    protected = {str(n) for n in host_network_state(net_host).protected}
    assert {"10.5.0.7/32", "10.6.0.0/16", "198.51.100.0/24", "10.7.0.9/32", "192.0.2.0/24"} <= protected


def test_it_resolves_the_names_of_the_portal_database_and_broker_into_protected_networks(
    world: World, net_host: Host, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {
        "redis.internal": ["10.5.2.1"],
        "agent-db.internal": ["10.5.3.1", "10.5.3.2"],
        "portal.example.net": ["203.0.113.80"],
    }
    asked: list[str] = []

    def getaddrinfo(name: str, port: Any, family: int, kind: int) -> list[Any]:
        asked.append(name)
        if name not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [(family, kind, 6, "", (address, 0)) for address in answers[name]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(network_services, "_names", NameCache())
    settings.REDIS_URL = settings.CELERY_BROKER_URL = "redis://:secret@redis.internal:6379/0"
    settings.BULKHEAD_AGENT_DATABASE_URL = "postgres://agent:pw@agent-db.internal:5432/bulkhead"
    settings.ALLOWED_HOSTS = ["portal.example.net", "*", ".example.org", "gone.internal", "localhost"]

    protected = {str(n) for n in network_services.protected_networks()}
    network_services.protected_networks()

    wanted = {"10.5.2.1/32", "10.5.3.1/32", "10.5.3.2/32", "203.0.113.80/32"}
    assert wanted <= protected
    assert not any(network.startswith("127.") for network in protected)
    # Patterns name no address; a name that does not resolve gives none; each name is asked once.
    assert "*" not in asked and ".example.org" not in asked and "gone.internal" in asked
    assert sorted(asked) == sorted(set(asked))


def test_it_lets_admins_manage_compartments_and_members_only_use_them(world: World) -> None:
    assert post_compartment(world, "mia", name="nope").status_code == 403
    assert post_compartment(world, "vic", name="nope").status_code == 403
    assert post_compartment(world, "mia_readonly", name="nope").status_code == 403
    assert post_compartment(world, "alice_acme", name="yes").status_code == 201
    assert not Compartment.objects.filter(name="nope").exists()


def test_it_counts_compartments_against_the_quota(world: World) -> None:
    Quota.objects.filter(tenant=world.acme).update(compartments=1)
    assert post_compartment(world, name="one").status_code == 201
    response = post_compartment(world, name="two")
    assert response.status_code == 409 and response.json()["error"]["code"] == "quota_exceeded"


def test_it_puts_workloads_into_the_default_compartment_created_on_first_use(
    world: World, net_host: Host
) -> None:
    one, two = new_workload(world, "one"), new_workload(world, "two")
    default = Compartment.objects.get(tenant=world.acme, name="default")
    addresses = {a.workload.name: a.address for a in IPAllocation.objects.select_related("workload")}
    assert addresses == {"one": "10.200.0.2", "two": "10.200.0.3"}
    assert Compartment.objects.filter(tenant=world.acme).count() == 1
    assert Quota.objects.get(tenant=world.acme).used_compartments == 1
    assert {a.compartment for a in IPAllocation.objects.filter(workload__in=[one, two])} == {default}


def test_it_leaves_workloads_of_a_host_without_compartments_off_the_network(world: World) -> None:
    Host.objects.create(name="bht-plain", cpus=4, memory_mib=8192, facts={"oci_runtimes": ["runc"]})
    new_workload(world, "plain")
    assert not Compartment.objects.exists() and not IPAllocation.objects.exists()


def test_it_joins_a_named_compartment_and_refuses_foreign_or_too_many(world: World, net_host: Host) -> None:
    actor = Actor(user=world.user("amir"))
    front = network_services.create_compartment(actor=actor, tenant=world.acme, name="front")
    back = network_services.create_compartment(actor=actor, tenant=world.acme, name="back")
    theirs = network_services.create_compartment(
        actor=Actor(user=world.user("bob")), tenant=world.globex, name="theirs"
    )
    web = new_workload(world, "web", [front])
    assert IPAllocation.objects.get(workload=web).compartment == front
    with pytest.raises(Invalid):
        new_workload(world, "spy", [theirs])
    with pytest.raises(Invalid):
        new_workload(world, "both", [front, back])
    assert list(Workload.objects.values_list("name", flat=True)) == ["web"]
    assert not Compartment.objects.filter(tenant=world.acme, name="default").exists()
    assert new_workload(world, "offline", []).ip_allocations.count() == 0


def test_it_retries_an_address_lost_to_a_concurrent_allocation(
    world: World, net_host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    new_workload(world, "first")
    original = network_services.ipam.allocate_address
    calls: list[IPv4Address] = []

    def stale(*args: Any, **kwargs: Any) -> IPv4Address:
        # The first attempt sees the table as a racing transaction did: without "first"'s address.
        address = IPv4Address("10.200.0.2") if not calls else original(*args, **kwargs)
        calls.append(address)
        return address

    monkeypatch.setattr(network_services.ipam, "allocate_address", stale)
    second = new_workload(world, "second")
    assert calls == [IPv4Address("10.200.0.2"), IPv4Address("10.200.0.3")]
    assert IPAllocation.objects.get(workload=second).address == "10.200.0.3"


def test_it_refuses_to_delete_a_compartment_in_use(world: World, net_host: Host) -> None:
    workload = new_workload(world, "user")
    default = Compartment.objects.get(name="default")
    response = client_for(world, "amir").delete(f"/api/v1/compartments/{default.pk}/")
    assert response.status_code == 409 and "user" in response.json()["error"]["message"]
    services.forget_workload(workload.pk)
    assert client_for(world, "amir").delete(f"/api/v1/compartments/{default.pk}/").status_code == 204
    assert Quota.objects.get(tenant=world.acme).used_compartments == 0


def test_it_shows_members_addresses_and_ports_of_a_compartment(world: World, net_host: Host) -> None:
    workload = new_workload(world, "web")
    assert post_port(world, workload).status_code == 201
    default = Compartment.objects.get(name="default")
    body = client_for(world, "vic").get(f"/api/v1/compartments/{default.pk}/").json()
    assert body["addresses"][0]["workload_name"] == "web" and body["addresses"][0]["address"] == "10.200.0.2"
    assert body["published_ports"][0]["host_port"] == 20000
    assert client_for(world, "bob").get(f"/api/v1/compartments/{default.pk}/").status_code == 404


def test_it_publishes_ports_from_the_operator_range(world: World, net_host: Host) -> None:
    web = new_workload(world, "web")
    first = post_port(world, web)
    second = post_port(world, web, workload_port=443)
    explicit = post_port(world, web, protocol="udp", workload_port=53, host_port=20053)
    assert first.status_code == 201, first.json()
    assert (first.json()["host_port"], second.json()["host_port"]) == (20000, 20001)
    assert explicit.json()["protocol"] == "udp" and explicit.json()["host_port"] == 20053
    op = Operation.objects.get(pk=first.json()["operation"]["id"])
    assert (op.kind, op.queue, op.params) == ("port.publish", net_host.queue, {"host": str(net_host.pk)})
    assert Quota.objects.get(tenant=world.acme).used_published_ports == 3


def test_it_refuses_bad_ports_clearly_and_changes_nothing(world: World, net_host: Host) -> None:
    web = new_workload(world, "web")
    assert post_port(world, web, host_port=20080).status_code == 201
    offline = new_workload(world, "offline", [])
    operations_before = Operation.objects.count()
    cases = [
        ({"host_port": 20080}, 409, "already published"),
        ({"host_port": 80}, 400, "published port range 20000-29999"),
        ({"host_port": 70000}, 400, "host_port"),
        ({"protocol": "sctp"}, 400, "protocol"),
        ({"workload_port": 0}, 400, "workload_port"),
    ]
    for body, status, says in cases:
        response = post_port(world, web, **body)
        assert response.status_code == status, (body, response.json())
        assert says in str(response.json()["error"]), (body, response.json())
    assert post_port(world, offline).status_code == 409
    assert post_port(world, web, persona="vic").status_code == 403
    assert post_port(world, web, persona="bob").status_code == 400  # not visible: "No such workload"
    assert PublishedPort.objects.count() == 1
    assert Operation.objects.count() == operations_before
    assert Quota.objects.get(tenant=world.acme).used_published_ports == 1


def test_it_counts_published_ports_against_the_quota_and_gives_them_back(
    world: World, net_host: Host
) -> None:
    Quota.objects.filter(tenant=world.acme).update(published_ports=1)
    web = new_workload(world, "web")
    port = post_port(world, web).json()
    assert post_port(world, web, workload_port=81).status_code == 409
    response = client_for(world, "mia").delete(f"/api/v1/published-ports/{port['id']}/")
    assert response.status_code == 202 and response.json()["kind"] == "port.unpublish"
    assert Quota.objects.get(tenant=world.acme).used_published_ports == 0
    assert post_port(world, web, workload_port=81).status_code == 201
    services.forget_workload(web.pk)
    assert Quota.objects.get(tenant=world.acme).used_published_ports == 0
    assert not PublishedPort.objects.exists() and not IPAllocation.objects.exists()


def test_it_builds_the_host_network_state_from_the_rows(world: World, net_host: Host) -> None:
    web, api = new_workload(world, "web"), new_workload(world, "api")
    post_port(world, web, host_port=20080)
    Workload.objects.filter(pk=api.pk).update(state="deleting")
    state = host_network_state(net_host)
    default = Compartment.objects.get(name="default")
    (compartment,) = state.compartments
    assert state.uplink == "up0"
    assert (compartment.compartment_id, compartment.bridge) == (default.network_id, default.bridge)
    assert dict(compartment.dns_names) == {"web": IPv4Address("10.200.0.2")}
    assert compartment.vni is None  # one host: no VXLAN
    assert [(p.protocol, p.host_port, str(p.dest_ip), p.dest_port) for p in state.ports] == [
        ("tcp", 20080, "10.200.0.2", 80)
    ]


def test_it_binds_each_workloads_port_to_its_mac_and_address(world: World, net_host: Host) -> None:
    web, vm = new_workload(world, "web"), new_workload(world, "vm")
    Workload.objects.filter(pk=vm.pk).update(isolation="microvm")
    vm.refresh_from_db()

    bindings = {b.port: b for b in host_network_state(net_host).bindings}

    for workload, port in ((web, host_veth_name_for(web.runtime_id)), (vm, tap_name(vm.pk))):
        allocation = IPAllocation.objects.get(workload=workload)
        assert bindings[port].mac == allocation.mac
        assert str(bindings[port].address) == allocation.address
    assert len(bindings) == 2


def test_it_spans_hosts_over_vxlan_when_members_live_on_two(world: World, net_host: Host) -> None:
    other = Host.objects.create(
        name="bht-net-other",
        cpus=8,
        memory_mib=16384,
        address="198.18.0.9",
        facts={"oci_runtimes": ["runc"]},
        labels={"network": "on", "uplink": "up0"},
    )
    web = new_workload(world, "web")
    api = new_workload(world, "api")
    Workload.objects.filter(pk=api.pk).update(host=other)
    Workload.objects.filter(pk=web.pk).update(host=net_host)
    (compartment,) = host_network_state(net_host).compartments
    assert compartment.vni == Compartment.objects.get(name="default").vni
    assert list(compartment.vxlan_peers) == [IPv4Address("198.18.0.9")]


def test_it_tells_the_other_hosts_of_a_compartment_when_a_member_joins_or_leaves(
    world: World, net_host: Host
) -> None:
    """Their VXLAN peers and DNS names change now, not at their next periodic re-apply."""
    from compute.services import forget_workload

    web = new_workload(world, "web")  # on net_host, the only host so far: nobody else to tell
    assert web.host == net_host
    assert not Operation.objects.filter(kind="compartment.sync").exists()
    other = Host.objects.create(
        name="bht-net-other",
        cpus=8,
        memory_mib=16384,
        address="198.18.0.9",
        facts={"oci_runtimes": ["runc"]},
        labels={"network": "on", "uplink": "up0"},
    )
    # A third member placed on `other` joins: net_host, where web lives, is told.
    net_host.pinned_only = True
    net_host.save()
    db = new_workload(world, "db")
    assert Workload.objects.get(pk=db.pk).host == other
    (sync,) = Operation.objects.filter(kind="compartment.sync")
    assert sync.queue == net_host.queue and sync.params == {"host": str(net_host.pk)}
    assert sync.target_label == "default"
    # db leaves: net_host is told again; `other`, where it lived, re-applies by itself.
    forget_workload(db.pk)
    syncs = Operation.objects.filter(kind="compartment.sync").order_by("created_at")
    assert [op.queue for op in syncs] == [net_host.queue, net_host.queue]


def test_it_places_a_workload_joining_a_compartment_on_a_host_that_realises_compartments(
    world: World, net_host: Host
) -> None:
    # A bigger host without compartments would win the spread; the compartment rules it out.
    Host.objects.create(name="aaa-plain", cpus=64, memory_mib=262144, facts={"oci_runtimes": ["runc"]})
    front = network_services.create_compartment(
        actor=Actor(user=world.user("amir")), tenant=world.acme, name="front"
    )

    assert new_workload(world, "web", [front]).host == net_host
    assert new_workload(world, "plain", []).host.name == "aaa-plain"  # type: ignore[union-attr]


def test_it_describes_a_micro_vms_nic_on_the_compartment_bridge(
    world: World, net_host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compute.host import network
    from compute.host.context import host_context

    monkeypatch.setattr(network, "apply_host", lambda ctx: (None, network.served_state(ctx)))
    workload = new_workload(world, "vm")
    allocation = IPAllocation.objects.get(workload=workload)
    nic = network.vm_network(host_context(workload.host_id), workload_spec(workload))
    assert nic is not None
    assert (nic.mac, nic.bridge) == (allocation.mac, allocation.compartment.bridge)
    assert (nic.ipv4_cidr, nic.gateway, nic.dns) == ("10.200.0.2/24", "10.200.0.1", "10.200.0.1")


def test_it_answers_conflicts_as_service_errors(world: World, net_host: Host) -> None:
    actor = Actor(user=world.user("amir"))
    network_services.create_compartment(actor=actor, tenant=world.acme, name="dup")
    with pytest.raises(Conflict):
        network_services.create_compartment(actor=actor, tenant=world.acme, name="dup")
