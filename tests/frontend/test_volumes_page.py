"""The volumes page: size, use bar, host, attachments and snapshots for the tenant; nothing of others."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import World
from tests.volumes.test_volumes_api import a_host, a_volume, a_workload
from volumes.models import GIB, Snapshot, Volume, VolumeAttachment

pytestmark = pytest.mark.django_db


def browser_for(world: World, username: str) -> Client:
    browser = Client()
    browser.force_login(world.user(username))
    return browser


def test_it_shows_a_volumes_use_host_attachments_and_snapshots(world: World) -> None:
    host = a_host("bht-page-host")
    volume = a_volume(world, "db-data", host, size_gib=4)
    Volume.objects.filter(pk=volume.pk).update(used_bytes=GIB)
    VolumeAttachment.objects.create(volume=volume, workload=a_workload(world, "db", host), path="/var/lib/db")
    Snapshot.objects.create(volume=volume, name="nightly", state="ready")

    page = browser_for(world, "vic").get("/volumes/").content.decode()

    assert "db-data" in page and "bht-page-host" in page and "/var/lib/db" in page and "nightly" in page
    assert 'aria-valuenow="25"' in page  # 1 of 4 GiB
    assert "Create a volume" not in page and ">Restore<" not in page  # a viewer changes nothing
    member = browser_for(world, "mia").get("/volumes/").content.decode()
    assert "Create a volume" in member and ">Restore<" in member
    workload_page = browser_for(world, "mia").get(f"/workloads/{volume.attachments.get().workload_id}/")
    assert "db-data" in workload_page.content.decode()


def test_it_shows_nothing_of_another_tenants_volumes(world: World) -> None:
    a_volume(world, "acme-secret-data", a_host())
    page = browser_for(world, "bob").get("/volumes/").content.decode()
    assert "acme-secret-data" not in page


def test_a_member_creates_a_volume_from_the_page(world: World) -> None:
    a_host()
    response = browser_for(world, "mia").post(
        "/volumes/create/", {"name": "cache", "size_gib": 2}, headers={"HX-Request": "true"}
    )
    assert response.status_code == 200
    assert Volume.objects.get(tenant=world.acme, name="cache").size_bytes == 2 * GIB
    assert "cache" in response.content.decode()


def test_an_attached_volume_is_not_deleted_and_the_page_says_why(world: World) -> None:
    host = a_host()
    volume = a_volume(world, "db-data", host)
    VolumeAttachment.objects.create(volume=volume, workload=a_workload(world, "db", host), path="/d")
    response = browser_for(world, "mia").post(f"/volumes/{volume.pk}/delete/", headers={"HX-Request": "true"})
    assert "attached to db" in response.content.decode()
    assert Volume.objects.get(pk=volume.pk).state == "ready"
