"""A workload's disk is quota'd per tenant and counted in its host's capacity, like its memory.

Rows only (no agent): creation answers before any host works, and what is refused creates nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

from compute import services
from compute.models import Host, Workload
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db


def container_host(name: str = "bht-disk-host", *, disk_gib: int | None = 100) -> Host:
    facts: dict[str, Any] = {"oci_runtimes": ["runc"]}
    if disk_gib is not None:
        facts["disk_gib"] = disk_gib
    return Host.objects.create(name=name, cpus=8, memory_mib=16384, facts=facts)


def create(world: World, **body: Any) -> Any:
    body = {"tenant": str(world.acme.pk), "compartments": [], **body}
    return client_for(world, "mia").post("/api/v1/workloads/", body, format="json")


def test_it_refuses_a_disk_beyond_the_tenants_quota_and_creates_nothing(world: World) -> None:
    container_host()
    image = db_image(world.acme, "img")
    Quota.objects.filter(tenant=world.acme).update(disk_gib=10)

    response = create(world, name="hog", image=str(image.pk), disk_gib=11)

    assert response.status_code == 409, response.json()
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert not Workload.objects.exists()
    quota = Quota.objects.get(tenant=world.acme)
    assert (quota.used_disk_gib, quota.used_workloads, quota.used_memory_mib) == (0, 0, 0)
    assert AuditEntry.objects.filter(action="quota.exceeded", tenant=world.acme).exists()


def test_it_charges_the_disk_and_gives_it_back_when_the_workload_goes(world: World) -> None:
    container_host()
    image = db_image(world.acme, "img")

    response = create(world, name="web", image=str(image.pk), disk_gib=3)
    assert response.status_code == 202, response.json()
    workload = Workload.objects.get(name="web")
    assert workload.disk_gib == 3
    assert Quota.objects.get(tenant=world.acme).used_disk_gib == 3

    services.forget_workload(workload.pk)

    assert Quota.objects.get(tenant=world.acme).used_disk_gib == 0


def test_it_defaults_to_one_gib_and_shows_it(world: World) -> None:
    container_host()
    image = db_image(world.acme, "img")

    assert create(world, name="web", image=str(image.pk)).status_code == 202

    workload = Workload.objects.get(name="web")
    body = client_for(world, "mia").get(f"/api/v1/workloads/{workload.pk}/").json()
    assert body["disk_gib"] == 1
    assert Quota.objects.get(tenant=world.acme).used_disk_gib == 1


@pytest.mark.parametrize("disk_gib", [0, -1, 10**9])
def test_it_refuses_a_disk_size_out_of_range(world: World, disk_gib: int) -> None:
    container_host()
    image = db_image(world.acme, "img")

    response = create(world, name="web", image=str(image.pk), disk_gib=disk_gib)

    assert response.status_code == 400, response.json()
    assert not Workload.objects.exists()


def test_it_places_a_workload_only_on_a_host_with_the_disk_free(world: World) -> None:
    small = container_host("bht-disk-small", disk_gib=5)
    image = db_image(world.acme, "img")
    assert create(world, name="first", image=str(image.pk), disk_gib=4).status_code == 202

    response = create(world, name="second", image=str(image.pk), disk_gib=2)

    assert response.status_code == 409, response.json()
    assert response.json()["error"]["code"] == "no_host_fits"
    assert list(Workload.objects.values_list("name", flat=True)) == ["first"]
    assert Quota.objects.get(tenant=world.acme).used_disk_gib == 4
    assert Workload.objects.get(name="first").host == small


def test_it_refuses_to_change_the_disk_in_place(world: World) -> None:
    container_host()
    image = db_image(world.acme, "img")
    assert create(world, name="web", image=str(image.pk), disk_gib=2).status_code == 202
    workload = Workload.objects.get(name="web")

    response = client_for(world, "mia").patch(
        f"/api/v1/workloads/{workload.pk}/", {"disk_gib": 50}, format="json"
    )

    assert response.status_code == 400, response.json()
    assert Workload.objects.get(pk=workload.pk).disk_gib == 2
    assert Quota.objects.get(tenant=world.acme).used_disk_gib == 2


def test_it_counts_a_micro_vms_export_disk_in_its_hosts_capacity(world: World) -> None:
    # A micro-VM's guest can fill its export disk (as large as its writable disk) while it runs: the
    # host's disk holds both, so placement counts both.
    Host.objects.create(
        name="bht-vm-disk",
        cpus=8,
        memory_mib=16384,
        facts={"oci_runtimes": ["runc"], "libvirt": True, "disk_gib": 10},
    )
    image = db_image(world.acme, "img")
    first = create(world, name="vm-one", image=str(image.pk), isolation="microvm", disk_gib=4)
    assert first.status_code == 202, first.json()  # 4 + 4 + 1 = 9 of 10
    second = create(world, name="vm-two", image=str(image.pk), isolation="microvm", disk_gib=1)
    assert second.status_code == 409, second.json()  # 3 more would not fit
    third = create(world, name="ct", image=str(image.pk), disk_gib=1)
    assert third.status_code == 202, third.json()  # a container's 1 does
    assert Quota.objects.get(tenant=world.acme).used_disk_gib == 5  # the tenant pays its disk_gib only
