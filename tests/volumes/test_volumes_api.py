"""Volumes through the API as tenants use them and as attackers try them (rows only, no agent).

Creation answers before any host works; what is refused changes nothing and leaves a denied audit entry.
"""

from __future__ import annotations

from typing import Any

import pytest

from compute.models import Host, Workload
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from tests.imaging.images import db_image
from volumes.models import GIB, Snapshot, Volume, VolumeAttachment

pytestmark = pytest.mark.django_db


def a_host(name: str = "bht-vol-a", *, pool_gib: int | None = 100, state: str = "ready") -> Host:
    facts: dict[str, Any] = {"oci_runtimes": ["runc"], "libvirt": True}
    if pool_gib is not None:
        facts["volume_pool"] = {"total_bytes": pool_gib * GIB, "used_bytes": 0, "free_bytes": pool_gib * GIB}
    return Host.objects.create(name=name, cpus=8, memory_mib=16384, facts=facts, state=state)


def a_volume(world: World, name: str, host: Host, *, tenant: Any = None, size_gib: int = 1) -> Volume:
    return Volume.objects.create(
        tenant=tenant or world.acme, name=name, host=host, size_bytes=size_gib * GIB, state="ready"
    )


def a_workload(
    world: World, name: str, host: Host, *, tenant: Any = None, state: str = "stopped"
) -> Workload:
    tenant = tenant or world.acme
    return Workload.objects.create(
        tenant=tenant, name=name, image=db_image(tenant, f"img-{name}"), host=host, state=state
    )


def post(world: World, persona: str, url: str, body: dict[str, Any]) -> Any:
    return client_for(world, persona).post(url, body, format="json")


def denied(action: str, tenant: Any) -> bool:
    return AuditEntry.objects.filter(action=action, outcome="denied", tenant=tenant).exists()


def test_it_creates_a_volume_on_a_host_with_room_charging_the_quota(world: World) -> None:
    a_host("bht-vol-small", pool_gib=1)
    roomy = a_host("bht-vol-roomy", pool_gib=100)

    response = post(
        world, "mia", "/api/v1/volumes/", {"tenant": str(world.acme.pk), "name": "db", "size_gib": 2}
    )

    assert response.status_code == 202, response.json()
    volume = Volume.objects.get(name="db")
    assert (volume.host, volume.size_bytes, volume.state) == (roomy, 2 * GIB, "creating")
    from portal.models import Operation

    assert Operation.objects.get(pk=response.json()["id"]).queue == roomy.queue
    assert Quota.objects.get(tenant=world.acme).used_volume_bytes == 2 * GIB
    assert AuditEntry.objects.filter(action="volume.create", tenant=world.acme, outcome="ok").exists()


def test_it_refuses_a_volume_over_the_quota_and_creates_nothing(world: World) -> None:
    a_host()
    Quota.objects.filter(tenant=world.acme).update(volume_bytes=2 * GIB)

    response = post(
        world, "mia", "/api/v1/volumes/", {"tenant": str(world.acme.pk), "name": "big", "size_gib": 3}
    )

    assert response.status_code == 409, response.json()
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert not Volume.objects.exists()
    assert Quota.objects.get(tenant=world.acme).used_volume_bytes == 0
    assert AuditEntry.objects.filter(action="quota.exceeded", tenant=world.acme).exists()


def test_it_refuses_a_volume_no_pool_can_hold(world: World) -> None:
    a_host(pool_gib=4)

    response = post(
        world, "mia", "/api/v1/volumes/", {"tenant": str(world.acme.pk), "name": "big", "size_gib": 5}
    )

    assert response.status_code == 409, response.json()
    assert not Volume.objects.exists()
    assert Quota.objects.get(tenant=world.acme).used_volume_bytes == 0
    assert denied("volume.create", world.acme)


def test_a_viewer_cannot_create_a_volume(world: World) -> None:
    a_host()
    response = post(
        world, "vic", "/api/v1/volumes/", {"tenant": str(world.acme.pk), "name": "v", "size_gib": 1}
    )
    assert response.status_code == 403
    assert not Volume.objects.exists()


def test_it_hides_another_tenants_volume_everywhere(world: World) -> None:
    host = a_host()
    secret = a_volume(world, "acme-data", host)
    bobs = a_workload(world, "bobs", host, tenant=world.globex)
    bob = client_for(world, "bob")

    assert bob.get(f"/api/v1/volumes/{secret.pk}/").status_code == 404
    assert bob.get("/api/v1/volumes/").json()["results"] == []
    attach = post(
        world, "bob", f"/api/v1/volumes/{secret.pk}/attach/", {"workload": str(bobs.pk), "path": "/d"}
    )
    assert attach.status_code == 404
    snap = post(world, "bob", f"/api/v1/volumes/{secret.pk}/snapshot/", {"name": "mine"})
    assert snap.status_code == 404
    assert bob.delete(f"/api/v1/volumes/{secret.pk}/").status_code == 404
    # By name or by id in a workload of his own: the same answer as a volume that does not exist.
    image = db_image(world.globex, "x")
    for ref in ("acme-data", str(secret.pk)):
        response = post(
            world,
            "bob",
            "/api/v1/workloads/",
            {
                "tenant": str(world.globex.pk),
                "name": "thief",
                "image": str(image.pk),
                "compartments": [],
                "volumes": [{"volume": ref, "path": "/data"}],
            },
        )
        assert response.status_code == 400, response.json()
        assert "No such volume" in response.json()["error"]["message"]
    assert not VolumeAttachment.objects.exists()
    assert Snapshot.objects.count() == 0


def test_it_refuses_to_attach_a_volume_twice_read_write(world: World) -> None:
    host = a_host()
    volume = a_volume(world, "db", host)
    first, second = a_workload(world, "db-1", host), a_workload(world, "db-2", host)
    url = f"/api/v1/volumes/{volume.pk}/attach/"

    assert post(world, "mia", url, {"workload": str(first.pk), "path": "/data"}).status_code == 201
    again = post(world, "mia", url, {"workload": str(second.pk), "path": "/data"})
    assert again.status_code == 409, again.json()
    read_only = post(world, "mia", url, {"workload": str(second.pk), "path": "/data", "read_only": True})
    assert read_only.status_code == 409  # while a writer has it
    assert list(VolumeAttachment.objects.values_list("workload__name", flat=True)) == ["db-1"]
    assert denied("volume.attach", world.acme)


def test_readers_share_a_volume_but_a_writer_does_not_join_them(world: World) -> None:
    host = a_host()
    volume = a_volume(world, "assets", host)
    web1, web2, writer = (a_workload(world, n, host) for n in ("web-1", "web-2", "writer"))
    url = f"/api/v1/volumes/{volume.pk}/attach/"
    for web in (web1, web2):
        assert (
            post(world, "mia", url, {"workload": str(web.pk), "path": "/srv", "read_only": True}).status_code
            == 201
        )
    assert post(world, "mia", url, {"workload": str(writer.pk), "path": "/srv"}).status_code == 409


def test_it_refuses_to_attach_to_a_workload_on_another_host(world: World) -> None:
    volume = a_volume(world, "db", a_host("bht-vol-a"))
    elsewhere = a_workload(world, "db", a_host("bht-vol-b"))

    response = post(
        world, "mia", f"/api/v1/volumes/{volume.pk}/attach/", {"workload": str(elsewhere.pk), "path": "/d"}
    )

    assert response.status_code == 409, response.json()
    assert not VolumeAttachment.objects.exists()
    assert denied("volume.attach", world.acme)


def test_it_refuses_to_attach_to_a_running_workload(world: World) -> None:
    host = a_host()
    volume = a_volume(world, "db", host)
    running = a_workload(world, "db", host, state="running")
    response = post(
        world, "mia", f"/api/v1/volumes/{volume.pk}/attach/", {"workload": str(running.pk), "path": "/d"}
    )
    assert response.status_code == 409
    assert not VolumeAttachment.objects.exists()


@pytest.mark.parametrize(
    "path",
    ["relative", "/", "/proc", "/proc/sys", "/dev/x", "/a/../etc", "/a//b", "/a/", "/a b", "/a\nb", "/a:b"],
)
def test_it_refuses_bad_mount_paths(world: World, path: str) -> None:
    host = a_host()
    volume = a_volume(world, "db", host)
    workload = a_workload(world, "db", host)
    response = post(
        world, "mia", f"/api/v1/volumes/{volume.pk}/attach/", {"workload": str(workload.pk), "path": path}
    )
    assert response.status_code == 400, response.json()
    assert not VolumeAttachment.objects.exists()


def test_it_refuses_to_delete_an_attached_volume(world: World) -> None:
    host = a_host()
    volume = a_volume(world, "db", host)
    workload = a_workload(world, "db", host)
    VolumeAttachment.objects.create(volume=volume, workload=workload, path="/data")

    response = client_for(world, "mia").delete(f"/api/v1/volumes/{volume.pk}/")

    assert response.status_code == 409, response.json()
    assert "db" in response.json()["error"]["message"]
    assert Volume.objects.get(pk=volume.pk).state == "ready"
    assert denied("volume.delete", world.acme)


def test_a_workload_goes_to_its_volumes_host(world: World) -> None:
    a_host("bht-vol-a")
    b = a_host("bht-vol-b")
    a_volume(world, "db", b)
    image = db_image(world.acme, "img")
    body = {
        "tenant": str(world.acme.pk),
        "image": str(image.pk),
        "compartments": [],
        "volumes": [{"volume": "db", "path": "/var/lib/db"}],
    }
    for index in range(3):  # not by chance
        response = post(
            world,
            "mia",
            "/api/v1/workloads/",
            {
                **body,
                "name": f"db-{index}",
                "volumes": [{"volume": "db", "path": "/var/lib/db", "read_only": True}],
            },
        )
        assert response.status_code == 202, response.json()
        assert Workload.objects.get(name=f"db-{index}").host == b
    detail = client_for(world, "mia").get(f"/api/v1/workloads/{Workload.objects.get(name='db-0').pk}/").json()
    assert detail["volumes"][0]["volume_name"] == "db" and detail["volumes"][0]["read_only"] is True


def test_a_workload_whose_volumes_host_cannot_take_it_is_refused_clearly(world: World) -> None:
    a_host("bht-vol-a")
    draining = a_host("bht-vol-b", state="draining")
    a_volume(world, "db", draining)
    image = db_image(world.acme, "img")

    response = post(
        world,
        "mia",
        "/api/v1/workloads/",
        {
            "tenant": str(world.acme.pk),
            "name": "db",
            "image": str(image.pk),
            "compartments": [],
            "volumes": [{"volume": "db", "path": "/data"}],
        },
    )

    assert response.status_code == 409, response.json()
    assert "bht-vol-b" in response.json()["error"]["message"]
    assert not Workload.objects.exists()
    assert Quota.objects.get(tenant=world.acme).used_workloads == 0


def test_it_refuses_a_restore_while_an_attached_workload_runs(world: World) -> None:
    host = a_host()
    volume = a_volume(world, "db", host)
    VolumeAttachment.objects.create(
        volume=volume, workload=a_workload(world, "db", host, state="running"), path="/d"
    )
    snapshot = Snapshot.objects.create(volume=volume, name="s1", state="ready")

    response = post(world, "mia", f"/api/v1/snapshots/{snapshot.pk}/restore/", {})

    assert response.status_code == 409, response.json()
    assert Volume.objects.get(pk=volume.pk).state == "ready"
    assert denied("snapshot.restore", world.acme)


def test_volumes_only_grow(world: World) -> None:
    host = a_host()
    volume = a_volume(world, "db", host, size_gib=2)
    Quota.objects.filter(tenant=world.acme).update(used_volume_bytes=2 * GIB)
    client = client_for(world, "mia")

    assert client.patch(f"/api/v1/volumes/{volume.pk}/", {"size_gib": 1}, format="json").status_code == 400
    response = client.patch(f"/api/v1/volumes/{volume.pk}/", {"size_gib": 5}, format="json")
    assert response.status_code == 202, response.json()
    assert Volume.objects.get(pk=volume.pk).size_bytes == 5 * GIB
    assert Quota.objects.get(tenant=world.acme).used_volume_bytes == 5 * GIB


def test_a_clone_is_a_new_volume_charged_to_the_tenant(world: World) -> None:
    host = a_host()
    volume = a_volume(world, "db", host, size_gib=2)
    snapshot = Snapshot.objects.create(volume=volume, name="s1", state="ready")

    response = post(world, "mia", f"/api/v1/snapshots/{snapshot.pk}/clone/", {"name": "db-copy"})

    assert response.status_code == 202, response.json()
    clone = Volume.objects.get(name="db-copy")
    assert (clone.host, clone.size_bytes, clone.cloned_from) == (host, 2 * GIB, snapshot)
    assert Quota.objects.get(tenant=world.acme).used_volume_bytes == 2 * GIB
