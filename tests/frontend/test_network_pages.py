"""The UI of networks: compartments, their members and published ports; services do the work and audit."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from compute import network_services
from compute.compartments import Compartment, IPAllocation, PublishedPort
from compute.models import Host, Workload
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.conftest import World
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


def signed_in(world: World, persona: str) -> Client:
    client = Client()
    client.force_login(world.user(persona))
    return client


def a_compartment(world: World, name: str = "front", tenant: Any = None, **kwargs: Any) -> Compartment:
    return network_services.create_compartment(
        actor=Actor(user=world.user("oscar")), tenant=tenant or world.acme, name=name, **kwargs
    )


def a_member(world: World, compartment: Compartment, name: str = "web") -> Workload:
    host = Host.objects.filter(name="net-ui-host").first() or Host.objects.create(
        name="net-ui-host", cpus=8, memory_mib=16384, labels={"network": "on"}
    )
    tenant = compartment.tenant
    workload = Workload.objects.create(
        tenant=tenant, name=name, image=db_image(tenant, f"img-{name}"), host=host
    )
    network_services.allocate_address(workload, compartment)
    return workload


def a_port(world: World, workload: Workload, port: int = 80) -> PublishedPort:
    published, _ = network_services.publish_port(
        actor=Actor(user=world.user("oscar")), workload=workload, workload_port=port
    )
    return published


# --- the list -------------------------------------------------------------------------------------


@pytest.mark.parametrize("persona", ["oscar", "alice", "amir", "mia", "vic"])
def test_it_lists_the_tenants_networks_for_every_role(world: World, persona: str) -> None:
    front = a_compartment(world, "front", subnet="10.210.0.0/24", nat=False)
    a_port(world, a_member(world, front))
    a_compartment(world, "hidden-net", tenant=world.globex)
    response = signed_in(world, persona).get(reverse("compartments"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "front" in html and "10.210.0.0/24" in html and "10.210.0.1" in html and "net-ui-host" in html
    assert "hidden-net" not in html
    row = html[html.index(f'data-compartment-id="{front.pk}"') :].split("</tr>")[0]
    assert "<td>No</td>" in row and row.count("<td>1</td>") == 2  # NAT off, one member, one port
    assert ('action="/networks/create/"' in html) == (persona in {"oscar", "alice", "amir"})
    assert ">Networks</a>" in html  # the nav link


def test_it_creates_a_network_and_audits_it(world: World) -> None:
    response = signed_in(world, "amir").post(
        reverse("compartment-create"), {"name": "back", "subnet": "10.220.0.0/24", "nat": "on"}
    )
    compartment = Compartment.objects.get(tenant=world.acme, name="back")
    assert response.status_code == 302 and response["Location"] == reverse(
        "compartment-detail", args=[compartment.pk]
    )
    assert (compartment.subnet, compartment.gateway, compartment.nat) == ("10.220.0.0/24", "10.220.0.1", True)
    assert AuditEntry.objects.filter(action="compartment.create", tenant=world.acme).exists()


def test_it_takes_a_subnet_from_the_pool_when_none_is_given(world: World) -> None:
    response = signed_in(world, "alice").post(reverse("compartment-create"), {"name": "auto"}, **HTMX)
    assert response.status_code == 200 and response["HX-Redirect"]
    compartment = Compartment.objects.get(name="auto")
    assert compartment.subnet.endswith("/24") and compartment.nat is False  # an unticked checkbox


def test_it_shows_the_services_refusals_next_to_the_fields(world: World) -> None:
    a_compartment(world, "front", subnet="10.210.0.0/24")
    client = signed_in(world, "amir")
    taken = client.post(reverse("compartment-create"), {"name": "front"}, **HTMX)
    assert taken.status_code == 422
    assert (
        'id="id_name_error"' in taken.content.decode() and "exists in this tenant" in taken.content.decode()
    )
    overlap = client.post(reverse("compartment-create"), {"name": "other", "subnet": "10.210.0.128/25"})
    assert overlap.status_code == 422
    assert 'id="id_subnet_error"' in overlap.content.decode() and "overlaps" in overlap.content.decode()
    bad = client.post(reverse("compartment-create"), {"name": "Not A Label"})
    assert bad.status_code == 422 and 'id="id_name_error"' in bad.content.decode()
    assert Compartment.objects.filter(tenant=world.acme).count() == 1


@pytest.mark.parametrize("persona", ["mia", "vic"])
def test_it_does_not_let_members_or_viewers_create_networks(world: World, persona: str) -> None:
    response = signed_in(world, persona).post(reverse("compartment-create"), {"name": "sneaky"})
    assert response.status_code == 404
    assert not Compartment.objects.filter(name="sneaky").exists()


# --- one network ----------------------------------------------------------------------------------


def test_it_shows_members_addresses_macs_and_ports(world: World) -> None:
    front = a_compartment(world, "front", subnet="10.210.0.0/24")
    web = a_member(world, front)
    port = a_port(world, web, 8080)
    allocation = IPAllocation.objects.get(workload=web)
    response = signed_in(world, "vic").get(reverse("compartment-detail", args=[front.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert allocation.address == "10.210.0.2" and allocation.address in html and allocation.mac in html
    assert f"<code>{port.host_port}</code>" in html and "<code>8080</code>" in html and "net-ui-host" in html
    # A viewer looks: no forms.
    assert reverse("port-unpublish", args=[port.pk]) not in html
    assert reverse("compartment-publish", args=[front.pk]) not in html
    assert reverse("compartment-delete", args=[front.pk]) not in html


def test_it_offers_members_publishing_and_admins_deleting(world: World) -> None:
    front = a_compartment(world, "front")
    a_port(world, a_member(world, front))
    html = signed_in(world, "mia").get(reverse("compartment-detail", args=[front.pk])).content.decode()
    assert reverse("compartment-publish", args=[front.pk]) in html and "Unpublish" in html
    assert reverse("compartment-delete", args=[front.pk]) not in html
    html = signed_in(world, "amir").get(reverse("compartment-detail", args=[front.pk])).content.decode()
    assert reverse("compartment-delete", args=[front.pk]) in html


def test_it_publishes_a_port_and_audits_it(world: World) -> None:
    front = a_compartment(world, "front")
    web = a_member(world, front)
    response = signed_in(world, "mia").post(
        reverse("compartment-publish", args=[front.pk]),
        {"workload": str(web.pk), "workload_port": "80", "protocol": "udp", "host_port": "20555"},
    )
    assert response.status_code == 302
    port = PublishedPort.objects.get(workload=web)
    assert (port.protocol, port.host_port, port.workload_port) == ("udp", 20555, 80)
    assert AuditEntry.objects.filter(action="port.publish", tenant=world.acme).exists()
    assert Operation.objects.filter(kind="port.publish", target_id=str(port.pk)).exists()


def test_it_shows_the_progress_of_a_publication_to_htmx(world: World) -> None:
    front = a_compartment(world, "front")
    web = a_member(world, front)
    response = signed_in(world, "mia").post(
        reverse("compartment-publish", args=[front.pk]),
        {"workload": str(web.pk), "workload_port": "443", "protocol": "tcp"},
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="compartment-ports",
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<section id="compartment-ports"') and "data-operation-id" in html
    assert "<code>443</code>" in html


def test_it_shows_publishing_refusals_next_to_the_fields(world: World) -> None:
    front = a_compartment(world, "front")
    web = a_member(world, front)
    a_port(world, web)  # takes 20000
    client = signed_in(world, "mia")
    out_of_range = client.post(
        reverse("compartment-publish", args=[front.pk]),
        {"workload": str(web.pk), "workload_port": "80", "protocol": "tcp", "host_port": "80"},
    )
    assert out_of_range.status_code == 422
    assert 'id="id_host_port_error"' in out_of_range.content.decode()
    taken = client.post(
        reverse("compartment-publish", args=[front.pk]),
        {"workload": str(web.pk), "workload_port": "81", "protocol": "tcp", "host_port": "20000"},
    )
    assert taken.status_code == 422 and "already published" in taken.content.decode()
    assert PublishedPort.objects.count() == 1


def test_it_only_publishes_workloads_of_the_network(world: World) -> None:
    front = a_compartment(world, "front")
    back = a_compartment(world, "back")
    other = a_member(world, back, "other")
    theirs = a_member(world, a_compartment(world, "g", tenant=world.globex), "theirs")
    client = signed_in(world, "mia")
    for workload in (other, theirs):
        response = client.post(
            reverse("compartment-publish", args=[front.pk]),
            {"workload": str(workload.pk), "workload_port": "80", "protocol": "tcp"},
        )
        assert response.status_code == 422
    assert not PublishedPort.objects.exists()


def test_it_unpublishes_a_port_and_audits_it(world: World) -> None:
    front = a_compartment(world, "front")
    port = a_port(world, a_member(world, front))
    response = signed_in(world, "mia").post(reverse("port-unpublish", args=[port.pk]))
    assert response.status_code == 302 and response["Location"] == reverse(
        "compartment-detail", args=[front.pk]
    )
    assert not PublishedPort.objects.filter(pk=port.pk).exists()
    assert AuditEntry.objects.filter(action="port.unpublish", tenant=world.acme).exists()


def test_a_viewer_cannot_publish_or_unpublish(world: World) -> None:
    front = a_compartment(world, "front")
    web = a_member(world, front)
    port = a_port(world, web)
    client = signed_in(world, "vic")
    assert client.post(reverse("port-unpublish", args=[port.pk])).status_code == 404
    response = client.post(
        reverse("compartment-publish", args=[front.pk]),
        {"workload": str(web.pk), "workload_port": "81", "protocol": "tcp"},
    )
    assert response.status_code == 404
    assert PublishedPort.objects.count() == 1


def test_it_deletes_an_unused_network_and_audits_it(world: World) -> None:
    front = a_compartment(world, "front")
    response = signed_in(world, "amir").post(reverse("compartment-delete", args=[front.pk]))
    assert response.status_code == 302 and response["Location"] == reverse("compartments")
    assert not Compartment.objects.filter(pk=front.pk).exists()
    assert AuditEntry.objects.filter(action="compartment.delete", tenant=world.acme).exists()


def test_it_refuses_to_delete_a_network_in_use_with_a_409(world: World) -> None:
    front = a_compartment(world, "front")
    a_member(world, front)
    response = signed_in(world, "alice").post(reverse("compartment-delete", args=[front.pk]))
    assert response.status_code == 409
    assert "is in use by workload(s) web" in response.content.decode()
    assert Compartment.objects.filter(pk=front.pk).exists()
    # htmx swaps no 409: the page reloads and shows the message.
    client = signed_in(world, "alice")
    response = client.post(reverse("compartment-delete", args=[front.pk]), **HTMX)
    assert response["HX-Redirect"] == reverse("compartment-detail", args=[front.pk])
    assert "is in use" in client.get(response["HX-Redirect"]).content.decode()


def test_a_member_cannot_delete_a_network(world: World) -> None:
    front = a_compartment(world, "front")
    assert signed_in(world, "mia").post(reverse("compartment-delete", args=[front.pk])).status_code == 404
    assert Compartment.objects.filter(pk=front.pk).exists()


def test_it_hides_another_tenants_network_and_ports(world: World) -> None:
    theirs = a_compartment(world, "secret", tenant=world.globex)
    port = a_port(world, a_member(world, theirs, "theirs"))
    client = signed_in(world, "alice")
    assert client.get(reverse("compartment-detail", args=[theirs.pk])).status_code == 404
    assert client.post(reverse("compartment-delete", args=[theirs.pk])).status_code == 404
    assert client.post(reverse("compartment-publish", args=[theirs.pk])).status_code == 404
    assert client.post(reverse("port-unpublish", args=[port.pk])).status_code == 404
    assert (
        Compartment.objects.filter(pk=theirs.pk).exists()
        and PublishedPort.objects.filter(pk=port.pk).exists()
    )


def test_it_refreshes_parts_for_htmx(world: World) -> None:
    front = a_compartment(world, "front")
    port = a_port(world, a_member(world, front))
    client = signed_in(world, "mia")
    table = client.get(reverse("compartments"), HTTP_HX_REQUEST="true", HTTP_HX_TARGET="compartment-table")
    assert table.content.decode().lstrip().startswith('<section id="compartment-table"')
    response = client.post(
        reverse("port-unpublish", args=[port.pk]), HTTP_HX_REQUEST="true", HTTP_HX_TARGET="compartment-ports"
    )
    html = response.content.decode()
    assert response.status_code == 200 and 'data-operation-id="' in html and "port.unpublish" in html
    assert f'data-port-id="{port.pk}"' not in html
