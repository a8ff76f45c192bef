"""The workload form puts a workload on a network and publishes its ports; its page shows their address."""

from __future__ import annotations

import pytest
from django.urls import reverse

from compute.compartments import PublishedPort
from compute.models import Host, Workload
from tests.conftest import World
from tests.frontend.test_network_pages import a_compartment, signed_in
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def network_host() -> Host:
    return Host.objects.create(
        name="form-host",
        cpus=8,
        memory_mib=16384,
        address="198.51.100.7",
        labels={"network": "on"},
        facts={"oci_runtimes": ["runc"]},
    )


def form(image_id: str, **fields: str) -> dict[str, str]:
    return {
        "name": "web",
        "image": image_id,
        "isolation": "namespace",
        "restart_policy": "never",
        "vcpus": "1",
        "memory_mib": "64",
        **fields,
    }


def test_it_creates_a_workload_on_a_chosen_network_with_published_ports(
    world: World, network_host: Host
) -> None:
    front = a_compartment(world, "front", subnet="10.211.0.0/24")
    image = db_image(world.acme, "web")
    client = signed_in(world, "mia")
    response = client.post(
        reverse("workload-create"), form(str(image.pk), network=str(front.pk), ports="8080, 53/udp")
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    workload = Workload.objects.get(tenant=world.acme, name="web")
    assert workload.ip_allocations.get().compartment == front  # type: ignore[attr-defined]
    published = sorted(
        PublishedPort.objects.filter(workload=workload).values_list("workload_port", "protocol")
    )
    assert published == [(53, "udp"), (8080, "tcp")]
    page = client.get(reverse("workload-detail", args=[workload.pk])).content.decode()
    port = PublishedPort.objects.get(workload=workload, protocol="tcp")
    assert f"198.51.100.7:{port.host_port}" in page and "8080/tcp" in page


def test_it_refuses_a_bad_port_and_creates_nothing(world: World, network_host: Host) -> None:
    image = db_image(world.acme, "web")
    response = signed_in(world, "mia").post(
        reverse("workload-create"), form(str(image.pk), ports="80, 99999")
    )
    assert response.status_code == 422
    assert "99999" in response.content.decode()
    assert not Workload.objects.filter(name="web").exists()


def test_it_refuses_another_tenants_network(world: World, network_host: Host) -> None:
    theirs = a_compartment(world, "theirs", tenant=world.globex, subnet="10.212.0.0/24")
    image = db_image(world.acme, "web")
    response = signed_in(world, "mia").post(
        reverse("workload-create"), form(str(image.pk), network=str(theirs.pk))
    )
    assert response.status_code == 422
    assert not Workload.objects.filter(name="web").exists()
