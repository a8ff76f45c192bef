"""Importing image archives: real archives, the real layer store, a real Celery worker for the main path."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from imaging.models import Image, ImageLayer, Layer, TenantLayer
from imaging.services import get_store
from portal.models import Operation
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from tests.imaging.images import (
    BuiltLayer,
    Entry,
    build_image,
    busybox_layers,
    digest_of,
    make_layer,
    many_files_layers,
    oci_archive_members,
    post_archive,
    run_inline,
    store_dir,
    tar_members,
    write_docker_archive,
    write_layout,
    write_oci_archive,
)
from tests.processes import celery_worker, wait_until

__all__ = ["store_dir"]


def finished(op_id: str) -> Operation | None:
    return Operation.objects.filter(pk=op_id, state__in=["succeeded", "failed"]).first()


def blob_stamps(store: Path) -> dict[str, tuple[int, int]]:
    root = store / "blobs" / "sha256"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.iterdir()}


def used_bytes(tenant: Any) -> int:
    return Quota.objects.get(tenant=tenant).used_image_bytes


@pytest.mark.django_db(transaction=True)
def test_it_imports_a_skopeo_archive_through_a_real_worker_and_dedups_storage(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    image = build_image(busybox_layers())
    layout = write_layout(image, tmp_path / "layout")
    archive = tmp_path / "busybox.tar"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{layout}:latest", f"oci-archive:{archive}:latest"],
        check=True,
        timeout=120,
    )
    layer_bytes = sum(len(layer.blob) for layer in image.layers)
    with celery_worker(BULKHEAD_STORE_DIR=str(store_dir)):
        response = post_archive(client_for(world, "mia"), archive, name="busybox", tag="1", tenant=world.acme)
        assert response.status_code == 202, response.content
        op = wait_until(lambda: finished(response.json()["id"]), timeout=120, what="the import")
        assert op.state == "succeeded", op.error
        first = Image.objects.get(tenant=world.acme, name="busybox", tag="1")
        assert first.manifest_digest == image.manifest_digest
        assert [il.layer.digest for il in first.image_layers.select_related("layer")] == [
            layer.digest for layer in image.layers
        ]
        assert first.config["cmd"] == ["/bin/sh"] and first.config["exposed_ports"] == ["8080/tcp"]
        assert used_bytes(world.acme) == layer_bytes
        store = get_store()
        assert all(store.has_layer(layer.diff_id) for layer in image.layers)
        assert os.path.islink(store.layer_path(image.layers[0].diff_id) / "bin" / "sh")
        assert not list((store_dir / "ingest").glob("upload-*")), "the upload is removed"
        stamps = blob_stamps(store_dir)

        # The same bytes again, under another tag: verified, but no layer byte written, no quota.
        again = post_archive(client_for(world, "alice"), archive, name="busybox", tag="2", tenant=world.acme)
        op2 = wait_until(lambda: finished(again.json()["id"]), timeout=120, what="the re-import")
        assert op2.state == "succeeded", op2.error
        assert op2.operator_details["layer_bytes_written"] == 0
        assert op2.operator_details["store"]["bytes_written"] == 0
        assert blob_stamps(store_dir) == stamps
        assert used_bytes(world.acme) == layer_bytes

        # Another tenant supplying the same bytes shares the storage but pays for it itself.
        other = post_archive(client_for(world, "bob"), archive, name="busybox", tag="1", tenant=world.globex)
        op3 = wait_until(lambda: finished(other.json()["id"]), timeout=120, what="globex's import")
        assert op3.state == "succeeded", op3.error
        assert op3.operator_details["layer_bytes_written"] == 0
    assert used_bytes(world.globex) == layer_bytes
    assert Layer.objects.count() == 2
    assert TenantLayer.objects.filter(tenant=world.globex).count() == 2
    assert Image.objects.count() == 3


@pytest.mark.django_db
def test_it_imports_a_docker_archive(world: World, store_dir: Path, tmp_path: Path) -> None:
    image = build_image(
        [
            make_layer({"bin/x": Entry(b"x")}, compress=False),
            make_layer({"etc/y": Entry(b"y")}, compress=False),
        ]
    )
    archive = write_docker_archive(image, tmp_path / "docker.tar")
    response = post_archive(client_for(world, "mia"), archive, name="dock", tag="1", tenant=world.acme)
    assert response.status_code == 202
    op = run_inline(response.json()["id"])
    assert op.state == "succeeded", op.error
    imported = Image.objects.get(name="dock")
    assert imported.config_digest == image.config_digest
    assert sorted(layer.diff_id for layer in imported.layers.all()) == sorted(
        layer.diff_id for layer in image.layers
    )
    assert get_store().has_layer(image.layers[0].diff_id)


@pytest.mark.django_db
def test_it_imports_an_image_of_many_files(world: World, store_dir: Path, tmp_path: Path) -> None:
    image = build_image(many_files_layers(3000))
    archive = write_oci_archive(image, tmp_path / "many.tar")
    response = post_archive(client_for(world, "alice"), archive, name="many", tag="1", tenant=world.acme)
    op = run_inline(response.json()["id"])
    assert op.state == "succeeded", op.error
    root = get_store().layer_path(image.layers[2].diff_id)
    assert sum(len(files) for _, _, files in os.walk(root)) == 1000
    assert Image.objects.get(name="many").size == sum(len(layer.blob) for layer in image.layers)


@pytest.mark.django_db
def test_an_operator_imports_a_layout_directory_as_a_public_image(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    layout = write_layout(build_image(busybox_layers()), tmp_path / "layout")
    client = client_for(world, "oscar")
    response = client.post(
        "/api/v1/images/import/", {"directory": str(layout), "name": "busybox", "tag": "public"}
    )
    assert response.status_code == 202, response.content
    assert run_inline(response.json()["id"]).state == "succeeded"
    public = Image.objects.get(tag="public")
    assert public.tenant is None
    assert client_for(world, "charlie").get(f"/api/v1/images/{public.pk}/").status_code == 200


@pytest.mark.django_db
def test_a_member_cannot_import_a_server_directory_or_a_public_image(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    layout = write_layout(build_image(busybox_layers()), tmp_path / "layout")
    client = client_for(world, "alice")
    response = client.post(
        "/api/v1/images/import/",
        {"directory": str(layout), "name": "x", "tag": "1", "tenant": str(world.acme.pk)},
    )
    assert response.status_code == 403
    archive = write_oci_archive(build_image(busybox_layers()), tmp_path / "a.tar")
    assert post_archive(client, archive, name="x", tag="1").status_code == 403
    assert not Operation.objects.filter(kind="image.import").exists()
    assert not list((store_dir / "ingest").glob("upload-*"))


@pytest.mark.django_db
def test_a_viewer_and_an_outsider_cannot_import(world: World, store_dir: Path, tmp_path: Path) -> None:
    archive = write_oci_archive(build_image(busybox_layers()), tmp_path / "a.tar")
    assert (
        post_archive(client_for(world, "vic"), archive, name="x", tag="1", tenant=world.acme).status_code
        == 403
    )
    assert (
        post_archive(client_for(world, "bob"), archive, name="x", tag="1", tenant=world.acme).status_code
        == 404
    )
    assert not list((store_dir / "ingest").glob("upload-*"))


@pytest.mark.django_db
def test_it_refuses_an_oversized_upload_with_413_and_keeps_nothing(
    world: World, store_dir: Path, tmp_path: Path, settings: Any
) -> None:
    settings.BULKHEAD_MAX_UPLOAD_BYTES = 64 * 1024
    archive = write_oci_archive(build_image(busybox_layers()), tmp_path / "big.tar")
    assert archive.stat().st_size > 64 * 1024
    response = post_archive(client_for(world, "mia"), archive, name="big", tag="1", tenant=world.acme)
    assert response.status_code == 413
    assert not Operation.objects.exists()
    assert not list((store_dir / "ingest").glob("upload-*"))


@pytest.mark.django_db
def test_it_fails_cleanly_when_the_quota_is_exhausted(world: World, store_dir: Path, tmp_path: Path) -> None:
    Quota.objects.filter(tenant=world.acme).update(image_bytes=1000)
    archive = write_oci_archive(build_image(busybox_layers()), tmp_path / "a.tar")
    response = post_archive(client_for(world, "mia"), archive, name="big", tag="1", tenant=world.acme)
    # Refused with the upload, before any import (tests/imaging/test_image_quota.py plays the rest).
    assert response.status_code == 409, response.json()
    assert not Operation.objects.exists()
    assert not Image.objects.exists() and not TenantLayer.objects.exists()
    assert used_bytes(world.acme) == 0
    assert AuditEntry.objects.filter(action="quota.exceeded", outcome="denied").exists()


# --- hostile archives ------------------------------------------------------------------------------


def _with_member(members: list[tuple[str, bytes]], name: str, data: bytes) -> list[tuple[str, bytes]]:
    return [*members, (name, data)]


def traversal_member(image: Any) -> list[tuple[str, bytes]]:
    return _with_member(oci_archive_members(image), "../../etc/evil", b"x")


def absolute_member(image: Any) -> list[tuple[str, bytes]]:
    return _with_member(oci_archive_members(image), "/etc/evil", b"x")


def missing_blob(image: Any) -> list[tuple[str, bytes]]:
    gone = "blobs/sha256/" + image.layers[1].digest.removeprefix("sha256:")
    return [(n, d) for n, d in oci_archive_members(image) if n != gone]


def digest_mismatch(image: Any) -> list[tuple[str, bytes]]:
    target = "blobs/sha256/" + image.layers[1].digest.removeprefix("sha256:")
    return [(n, d[:-1] + bytes([d[-1] ^ 1]) if n == target else d) for n, d in oci_archive_members(image)]


def oversized_index(image: Any) -> list[tuple[str, bytes]]:
    huge = json.dumps({"schemaVersion": 2, "manifests": [], "pad": "x" * (5 * 1024 * 1024)}).encode()
    return [(n, huge if n == "index.json" else d) for n, d in oci_archive_members(image)]


def duplicate_member(image: Any) -> list[tuple[str, bytes]]:
    return _with_member(oci_archive_members(image), "index.json", b"{}")


HOSTILE = {
    "path traversal": (traversal_member, "unsafe member name"),
    "absolute name": (absolute_member, "unsafe member name"),
    "missing blob": (missing_blob, "missing the layer blob"),
    "digest mismatch": (digest_mismatch, "digest mismatch"),
    "oversized manifest": (oversized_index, "larger than"),
    "duplicate member": (duplicate_member, "twice"),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_archive_fails_clearly_and_changes_nothing(
    world: World, store_dir: Path, tmp_path: Path, case: str
) -> None:
    build, message = HOSTILE[case]
    image = build_image(busybox_layers(marker=case))
    archive = tar_members(tmp_path / "hostile.tar", build(image))
    response = post_archive(client_for(world, "mia"), archive, name="evil", tag="1", tenant=world.acme)
    assert response.status_code == 202
    op = run_inline(response.json()["id"])
    assert op.state == "failed"
    assert message.lower() in op.error.lower(), op.error
    assert not Image.objects.exists() and not Layer.objects.exists() and not TenantLayer.objects.exists()
    assert used_bytes(world.acme) == 0
    assert not list((store_dir / "ingest").glob("upload-*"))
    assert not get_store().has_blob(image.layers[1].digest)


@pytest.mark.django_db
def test_a_layer_that_escapes_its_root_is_refused(world: World, store_dir: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    evil = buf.getvalue()
    image = build_image([BuiltLayer(evil, evil, "application/vnd.oci.image.layer.v1.tar")])
    archive = write_oci_archive(image, tmp_path / "escape.tar")
    response = post_archive(client_for(world, "mia"), archive, name="escape", tag="1", tenant=world.acme)
    op = run_inline(response.json()["id"])
    assert op.state == "failed"
    assert "unsafe" in op.error.lower() or "escape" in op.error.lower(), op.error
    assert not Image.objects.exists() and not Layer.objects.exists()
    assert not (tmp_path.parent / "escaped").exists()


@pytest.mark.django_db
def test_a_config_that_lies_about_diff_ids_is_refused(world: World, store_dir: Path, tmp_path: Path) -> None:
    layers = busybox_layers()
    image = build_image(layers, diff_ids=[layers[0].diff_id, digest_of(b"something else")])
    archive = write_oci_archive(image, tmp_path / "lie.tar")
    response = post_archive(client_for(world, "mia"), archive, name="lie", tag="1", tenant=world.acme)
    op = run_inline(response.json()["id"])
    assert op.state == "failed"
    assert "mismatch" in op.error.lower(), op.error
    assert not Image.objects.exists() and not ImageLayer.objects.exists()
    assert used_bytes(world.acme) == 0


@pytest.mark.django_db
def test_it_refuses_an_image_whose_config_claims_another_tenants_layer(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    secret = make_layer({"etc/globex-secret": Entry(b"globex payroll\n", mode=0o600)})
    private = build_image([*busybox_layers(), secret])
    archive = write_oci_archive(private, tmp_path / "private.tar")
    response = post_archive(client_for(world, "bob"), archive, name="private", tag="1", tenant=world.globex)
    globex_op = run_inline(response.json()["id"])
    assert globex_op.state == "succeeded", globex_op.error

    # acme knows (or guesses) the DiffID and ships any small blob under it.
    decoy = make_layer({"decoy": Entry(b"x")})
    forged = build_image(
        [*busybox_layers(), decoy], diff_ids=[*(layer.diff_id for layer in busybox_layers()), secret.diff_id]
    )
    archive = write_oci_archive(forged, tmp_path / "forged.tar")
    response = post_archive(client_for(world, "mia"), archive, name="stolen", tag="1", tenant=world.acme)
    op = run_inline(response.json()["id"])

    assert op.state == "failed"
    assert not Image.objects.filter(tenant=world.acme).exists()
    assert not TenantLayer.objects.filter(tenant=world.acme, layer__diff_id=secret.diff_id).exists()
    assert not Layer.objects.filter(digest=decoy.digest).exists()
    assert AuditEntry.objects.filter(action="image.import", outcome="failed", tenant=world.acme).exists()
    # The same forged blob is refused again (the store remembers what it really unpacks to).
    response = post_archive(client_for(world, "mia"), archive, name="stolen", tag="2", tenant=world.acme)
    assert run_inline(response.json()["id"]).state == "failed"
    assert not Image.objects.filter(tenant=world.acme).exists()


@pytest.mark.django_db
def test_it_imports_a_debootstrap_tree_with_device_nodes_and_warns_about_them(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    from tests.imaging import hostile

    tar = hostile.archive(
        hostile.member("./", kind=b"5", mode=0o755),
        hostile.member("./dev/", kind=b"5", mode=0o755),
        hostile.member("./dev/full", kind=b"3", devmajor=1, devminor=7, mode=0o666),
        hostile.member("./dev/null", kind=b"3", devmajor=1, devminor=3, mode=0o666),
        hostile.member("./etc/debian_version", b"12.8\n"),
    )
    layer = BuiltLayer(tar, tar, "application/vnd.oci.image.layer.v1.tar")
    archive = write_oci_archive(build_image([layer]), tmp_path / "debian.tar")
    response = post_archive(client_for(world, "mia"), archive, name="debian", tag="12", tenant=world.acme)
    op = run_inline(response.json()["id"])

    assert op.state == "succeeded", op.error
    [warning] = op.result["warnings"]
    assert "./dev/full" in warning and "./dev/null" in warning
    shown = client_for(world, "mia").get(f"/api/v1/operations/{op.pk}/").json()
    assert shown["result"]["warnings"] == [warning]
    image = Image.objects.get(tenant=world.acme, name="debian")
    entry = AuditEntry.objects.get(action="image.import.succeeded", object_id=str(image.pk))
    assert entry.details["warnings"] == [warning]
    assert (get_store().layer_path(layer.diff_id) / "etc/debian_version").read_bytes() == b"12.8\n"
