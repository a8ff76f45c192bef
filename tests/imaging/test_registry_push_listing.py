"""A pushed image is an Image of its tenant from the manifest's 201 on: listed while its layers unpack,
refused (409, with the operation to follow) to workloads until they are unpacked."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from django.test import Client

from compute.models import Host, Workload
from imaging.models import Image, RegistryTag
from portal.models import Operation
from tenants.models import AuditEntry
from tests.conftest import World, client_for
from tests.imaging.hostile import archive, member
from tests.imaging.images import BuiltLayer, build_image, busybox_layers, run_inline, write_layout
from tests.imaging.test_registry_push import push_by_http, skopeo_push
from tests.imaging.test_registry_server import token_of

pytestmark = pytest.mark.django_db(transaction=True)


def listed(world: World, persona: str, name: str) -> list[dict[str, object]]:
    rows = client_for(world, persona).get("/api/v1/images/", {"name": name}).json()
    return list(rows["results"] if isinstance(rows, dict) else rows)


def test_it_lists_a_pushed_image_the_moment_skopeo_push_returns(
    world: World, registry_server: str, tmp_path: Path
) -> None:
    built = build_image(busybox_layers("listed-at-once"))
    layout = write_layout(built, tmp_path / "layout")
    secret = token_of(world, "mia")

    pushed = skopeo_push(layout, registry_server, "acme/quick:1", f"mia:{secret}")

    # No worker runs in this test: what is listed now was written before the manifest's 201.
    assert pushed.returncode == 0, pushed.stderr
    op = Operation.objects.get(kind="image.push", tenant=world.acme)
    (row,) = listed(world, "vic", "quick")
    assert (row["tag"], row["state"], row["operation"], row["manifest_digest"]) == (
        "1",
        "unpacking",
        str(op.pk),
        built.manifest_digest,
    )
    assert row["size"] == sum(len(layer.blob) for layer in built.layers)
    assert op.target_id == row["id"]
    browser = Client()
    browser.force_login(world.user("vic"))
    page = browser.get("/images/").content.decode()
    assert "quick" in page and "Unpacking" in page
    assert listed(world, "bob", "quick") == []

    done = run_inline(str(op.pk))

    assert done.state == "succeeded", done.error  # type: ignore[attr-defined]
    (row,) = listed(world, "vic", "quick")
    assert (row["state"], row["progress"], len(row["layers"])) == ("ready", 100, len(built.layers))  # type: ignore[arg-type]


def test_it_answers_409_to_a_workload_on_an_image_still_unpacking(world: World, registry_server: str) -> None:
    built = build_image(busybox_layers("not-yet"))
    auth = ("mia", token_of(world, "mia"))
    assert push_by_http(registry_server, auth, "acme/notyet", "1", built).status_code == 201
    image = Image.objects.get(tenant=world.acme, name="notyet")
    op = Operation.objects.get(kind="image.push", tenant=world.acme)

    refused = client_for(world, "mia").post(
        "/api/v1/workloads/", {"name": "early", "image": str(image.pk)}, format="json"
    )

    assert refused.status_code == 409
    assert (
        "being unpacked" in refused.json()["error"]["message"]
        and str(op.pk) in refused.json()["error"]["message"]
    )
    assert not Workload.objects.filter(name="early").exists()
    assert AuditEntry.objects.filter(
        action="workload.create", outcome="denied", actor=world.user("mia")
    ).exists()
    tag = client_for(world, "mia").post(
        f"/api/v1/images/{image.pk}/tag/", {"name": "x", "tag": "2"}, format="json"
    )
    assert tag.status_code == 409


def test_it_refuses_to_move_a_tag_off_an_image_a_workload_uses_and_changes_nothing(
    world: World, registry_server: str
) -> None:
    auth = ("mia", token_of(world, "mia"))
    first = build_image(busybox_layers("in-use-1"))
    assert push_by_http(registry_server, auth, "acme/busy", "1", first).status_code == 201
    assert run_inline(str(Operation.objects.get(kind="image.push").pk)).state == "succeeded"  # type: ignore[attr-defined]
    used = Image.objects.get(tenant=world.acme, name="busy", tag="1")
    host = Host.objects.create(name="listing-host", cpus=4, memory_mib=4096)
    Workload.objects.create(tenant=world.acme, name="user-of-busy", image=used, host=host)

    moved = push_by_http(registry_server, auth, "acme/busy", "1", build_image(busybox_layers("in-use-2")))

    assert moved.status_code == 409 and moved.json()["errors"][0]["code"] == "DENIED"
    assert "workload" in moved.json()["errors"][0]["message"]
    assert Image.objects.get(tenant=world.acme, name="busy", tag="1").pk == used.pk
    assert RegistryTag.objects.get(tenant=world.acme, repository="busy", tag="1").manifest.digest == (
        first.manifest_digest
    )
    assert Operation.objects.filter(kind="image.push").count() == 1
    assert AuditEntry.objects.filter(
        action="registry.push", outcome="denied", actor=world.user("mia")
    ).exists()


def test_it_lists_a_hostile_push_while_it_unpacks_and_removes_it_when_refused(
    world: World, registry_server: str
) -> None:
    tar = archive(member("../escaped", b"owned"))
    built = build_image([BuiltLayer(tar, tar, "application/vnd.oci.image.layer.v1.tar")])
    auth = ("mia", token_of(world, "mia"))
    assert push_by_http(registry_server, auth, "acme/evil", "1", built).status_code == 201
    assert [row["state"] for row in listed(world, "mia", "evil")] == ["unpacking"]

    done = run_inline(str(Operation.objects.get(kind="image.push").pk))

    assert done.state == "failed"  # type: ignore[attr-defined]
    assert listed(world, "mia", "evil") == []
    assert httpx.head(f"http://{registry_server}/v2/acme/evil/manifests/1", auth=auth).status_code == 404


def test_it_shows_an_image_whose_unpacking_was_lost_as_failed_and_takes_it_again(
    world: World, registry_server: str
) -> None:
    built = build_image(busybox_layers("lost-unpack"))
    auth = ("mia", token_of(world, "mia"))
    assert push_by_http(registry_server, auth, "acme/lost", "1", built).status_code == 201
    op = Operation.objects.get(kind="image.push")
    Operation.objects.filter(pk=op.pk).update(state="failed", error="The worker was lost.")

    assert [row["state"] for row in listed(world, "mia", "lost")] == ["failed"]
    image = Image.objects.get(name="lost")
    refused = client_for(world, "mia").post(
        "/api/v1/workloads/", {"name": "late", "image": str(image.pk)}, format="json"
    )
    assert refused.status_code == 409 and "could not be unpacked" in refused.json()["error"]["message"]

    assert push_by_http(registry_server, auth, "acme/lost", "1", built).status_code == 201
    again = Operation.objects.filter(kind="image.push").exclude(pk=op.pk).get()
    assert run_inline(str(again.pk)).state == "succeeded"  # type: ignore[attr-defined]
    assert [row["state"] for row in listed(world, "mia", "lost")] == ["ready"]
