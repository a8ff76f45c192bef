"""The image API: visibility through the permission layer, tagging, deleting, quotas, the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from imaging import services
from imaging.models import Image, TenantLayer
from imaging.services import get_store
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from tests.imaging.images import (
    build_image,
    busybox_layers,
    db_image,
    post_archive,
    run_inline,
    store_dir,
    write_oci_archive,
)

__all__ = ["store_dir"]


def list_queries(client: Any, url: str = "/api/v1/images/") -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx.captured_queries)


@pytest.mark.django_db
def test_the_list_costs_a_constant_number_of_queries(world: World) -> None:
    client = client_for(world, "alice")
    db_image(world.acme, "one")
    few = list_queries(client)
    for n in range(6):
        db_image(world.acme, f"img{n}", layer_seeds=(f"x{n}", f"y{n}", "shared"))
    assert list_queries(client) == few


@pytest.mark.django_db
def test_members_see_their_tenants_images_and_public_ones_only(world: World) -> None:
    mine = db_image(world.acme, "mine")
    db_image(world.globex, "theirs")
    public = db_image(None, "public")
    names = {i["name"] for i in client_for(world, "vic").get("/api/v1/images/").json()["results"]}
    assert names == {"mine", "public"}
    assert {i["name"] for i in client_for(world, "charlie").get("/api/v1/images/").json()["results"]} == {
        "public"
    }
    assert len(client_for(world, "oscar").get("/api/v1/images/").json()["results"]) == 3
    body = client_for(world, "alice").get(f"/api/v1/images/{mine.pk}/").json()
    assert body["config"]["cmd"] == ["/bin/sh"] and [layer["size"] for layer in body["layers"]] == [100, 100]
    assert client_for(world, "alice").get(f"/api/v1/images/{public.pk}/").json()["public"] is True


@pytest.mark.django_db
def test_it_filters_by_name_and_tenant(world: World) -> None:
    db_image(world.acme, "web")
    db_image(world.acme, "db")
    db_image(None, "web", tag="public")
    client = client_for(world, "alice")
    assert {i["tag"] for i in client.get("/api/v1/images/?name=web").json()["results"]} == {"1", "public"}
    by_tenant = client.get(f"/api/v1/images/?tenant={world.acme.pk}").json()["results"]
    assert {i["name"] for i in by_tenant} == {"web", "db"}


@pytest.mark.django_db
def test_a_foreign_image_answers_404_for_every_verb(world: World) -> None:
    theirs = db_image(world.globex, "theirs")
    client = client_for(world, "alice")
    assert client.get(f"/api/v1/images/{theirs.pk}/").status_code == 404
    assert client.delete(f"/api/v1/images/{theirs.pk}/").status_code == 404
    assert client.post(f"/api/v1/images/{theirs.pk}/tag/", {"name": "x", "tag": "1"}).status_code == 404
    assert Image.objects.filter(pk=theirs.pk).exists()


@pytest.mark.django_db
def test_alice_cannot_use_globex_as_her_tenant(world: World) -> None:
    client = client_for(world, "alice")
    response = client.post(
        "/api/v1/images/pull/", {"reference": "127.0.0.1:5000/a/b:1", "tenant": str(world.globex.pk)}
    )
    assert response.status_code == 404


@pytest.mark.django_db
def test_shared_names_only_layers_shared_with_images_the_user_can_see(world: World) -> None:
    first = db_image(world.acme, "first", layer_seeds=("common", "own1"))
    db_image(world.acme, "second", layer_seeds=("common", "own2"))
    db_image(world.globex, "theirs", layer_seeds=("own1",))
    layers = client_for(world, "alice").get(f"/api/v1/images/{first.pk}/").json()["layers"]
    assert [layer["shared"] for layer in layers] == [True, False]


@pytest.mark.django_db
def test_a_viewer_cannot_delete_or_tag(world: World) -> None:
    image = db_image(world.acme, "web")
    client = client_for(world, "vic")
    assert client.delete(f"/api/v1/images/{image.pk}/").status_code == 403
    assert client.post(f"/api/v1/images/{image.pk}/tag/", {"name": "web", "tag": "2"}).status_code == 403
    assert client_for(world, "mia_readonly").delete(f"/api/v1/images/{image.pk}/").status_code == 403


@pytest.mark.django_db
def test_tagging_gives_the_same_content_a_new_name(world: World) -> None:
    image = db_image(world.acme, "web")
    client = client_for(world, "mia")
    response = client.post(f"/api/v1/images/{image.pk}/tag/", {"name": "web", "tag": "stable"})
    assert response.status_code == 201, response.content
    assert response.json()["manifest_digest"] == image.manifest_digest
    assert [layer["digest"] for layer in response.json()["layers"]] == [
        il.layer.digest for il in image.image_layers.all()
    ]
    again = client.post(f"/api/v1/images/{image.pk}/tag/", {"name": "web", "tag": "stable"})
    assert again.status_code == 409
    assert AuditEntry.objects.filter(action="image.tag").count() == 1


@pytest.mark.django_db
def test_only_operators_publish(world: World) -> None:
    image = db_image(world.acme, "web")
    assert (
        client_for(world, "alice")
        .post(f"/api/v1/images/{image.pk}/publish/", {"name": "web", "tag": "pub"})
        .status_code
        == 403
    )
    response = client_for(world, "oscar").post(
        f"/api/v1/images/{image.pk}/publish/", {"name": "web", "tag": "pub"}
    )
    assert response.status_code == 201
    assert response.json()["public"] is True


@pytest.mark.django_db
def test_deleting_releases_only_layers_no_other_image_of_the_tenant_uses(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    archive = write_oci_archive(build_image(busybox_layers()), tmp_path / "a.tar")
    client = client_for(world, "mia")
    ops = [
        post_archive(client, archive, name="bb", tag=t, tenant=world.acme).json()["id"] for t in ("1", "2")
    ]
    assert all(run_inline(op).state == "succeeded" for op in ops)
    used = Quota.objects.get(tenant=world.acme).used_image_bytes
    first, second = Image.objects.order_by("tag")
    assert client.delete(f"/api/v1/images/{first.pk}/").status_code == 204
    assert Quota.objects.get(tenant=world.acme).used_image_bytes == used
    assert client.delete(f"/api/v1/images/{second.pk}/").status_code == 204
    assert Quota.objects.get(tenant=world.acme).used_image_bytes == 0
    assert not TenantLayer.objects.exists()
    assert AuditEntry.objects.filter(action="image.delete", outcome="ok").count() == 2


@pytest.mark.django_db
def test_deleting_an_image_in_use_is_refused_with_409(world: World, monkeypatch: Any) -> None:
    image = db_image(world.acme, "web")
    monkeypatch.setattr(services, "image_in_use", lambda image: True)
    assert client_for(world, "alice").delete(f"/api/v1/images/{image.pk}/").status_code == 409
    assert Image.objects.filter(pk=image.pk).exists()
    assert AuditEntry.objects.filter(action="image.delete", outcome="denied").exists()


@pytest.mark.django_db
def test_an_image_no_workload_runs_is_not_in_use(world: World) -> None:
    assert services.image_in_use(db_image(world.acme, "web")) is False


@pytest.mark.django_db
def test_store_usage_shows_operators_the_store_and_members_their_tenants(
    world: World, store_dir: Path
) -> None:
    db_image(world.acme, "web")
    body = client_for(world, "oscar").get("/api/v1/store/").json()
    assert {"blobs_bytes", "layers_bytes", "disks_bytes"} <= set(body["store"])
    assert {row["tenant_name"] for row in body["tenants"]} == {"acme", "globex"}
    mine = client_for(world, "alice").get("/api/v1/store/").json()
    assert "store" not in mine and [row["tenant_name"] for row in mine["tenants"]] == ["acme"]
    assert mine["tenants"][0]["images"] == 1 and mine["tenants"][0]["layers"] == 2


@pytest.mark.django_db
def test_gc_removes_what_no_image_references_and_keeps_leased_content(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    kept = build_image(busybox_layers("kept"))
    dropped = build_image(busybox_layers("dropped"))
    client = client_for(world, "mia")
    for image, name in ((kept, "kept"), (dropped, "dropped")):
        archive = write_oci_archive(image, tmp_path / f"{name}.tar")
        assert (
            run_inline(
                post_archive(client, archive, name=name, tag="1", tenant=world.acme).json()["id"]
            ).state
            == "succeeded"
        )
    store = get_store()
    leased = build_image(busybox_layers("leased"))
    store.ingest_bytes(leased.layers[1].blob)
    lease = store.acquire_lease("test-import", [leased.layers[1].digest])
    client.delete(f"/api/v1/images/{Image.objects.get(name='dropped').pk}/")
    assert client_for(world, "alice").post("/api/v1/store/gc/").status_code == 403
    response = client_for(world, "oscar").post("/api/v1/store/gc/")
    assert response.status_code == 202
    op = run_inline(response.json()["id"])
    assert op.state == "succeeded", op.error
    # Fresh imports keep their leases a while after commit (a gc racing the commit must not win).
    assert op.result["removed_blobs"] == 0 and store.has_blob(dropped.layers[1].digest)
    for path in (store_dir / "leases").glob("op-*.json"):
        path.unlink()
    op = run_inline(client_for(world, "oscar").post("/api/v1/store/gc/").json()["id"])
    assert op.state == "succeeded", op.error
    assert op.result["removed_blobs"] >= 1
    assert not store.has_blob(dropped.layers[1].digest)
    assert not store.has_layer(dropped.layers[1].diff_id)
    assert store.has_blob(kept.layers[1].digest) and store.has_layer(kept.layers[1].diff_id)
    assert store.has_blob(kept.layers[0].digest), "the busybox layer is shared and still referenced"
    assert store.has_blob(leased.layers[1].digest)
    lease.release()
