"""What a failed or finished operation tells a tenant: their own errors in full, nothing of the host or
of what other tenants hold. Operators read the real error and the store's figures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from django.test import Client

from portal.errors import INTERNAL_FAILURE
from portal.models import Operation
from tests.conftest import World, client_for
from tests.imaging.images import build_image, busybox_layers, post_archive, write_docker_archive
from tests.processes import celery_worker, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HOST_DETAIL = "os error 28"  # ENOSPC, as the store reports it to operators


def finished(op_id: str) -> Operation | None:
    return Operation.objects.filter(pk=op_id, state__in=["succeeded", "failed"]).first()


def import_archive(world: World, username: str, archive: Path, tenant: object, tag: str) -> Operation:
    response = post_archive(client_for(world, username), archive, name="busybox", tag=tag, tenant=tenant)
    assert response.status_code == 202, response.content
    return wait_until(lambda: finished(response.json()["id"]), timeout=120, what="the import")


def test_it_shows_a_tenant_a_generic_error_and_an_operator_the_real_one(
    world: World, settings: object, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    settings.BULKHEAD_STORE_DIR = store  # type: ignore[attr-defined]
    archive = write_docker_archive(build_image(busybox_layers()), tmp_path / "busybox.tar")
    # The store's disk fills up (a platform problem, not the tenant's): room for the upload, not for
    # its blobs too. The store's error says what it was writing.
    store.mkdir()
    room = archive.stat().st_size * 3 // 2
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(store)], check=True)
    try:
        with celery_worker(BULKHEAD_STORE_DIR=str(store)):
            op = import_archive(world, "alice", archive, world.acme, "1")
    finally:
        subprocess.run(["umount", "-l", str(store)], check=True)
    assert op.state == "failed"
    assert op.error == INTERNAL_FAILURE
    assert HOST_DETAIL in op.operator_details["error"]

    as_tenant = client_for(world, "alice").get(f"/api/v1/operations/{op.pk}/").json()
    assert as_tenant["error"] == INTERNAL_FAILURE
    assert "operator_details" not in as_tenant
    assert str(tmp_path) not in str(client_for(world, "alice").get(f"/api/v1/operations/{op.pk}/log/").json())
    browser = Client()
    browser.force_login(world.user("alice"))
    assert str(tmp_path) not in browser.get(f"/operations/{op.pk}/").content.decode()

    assert HOST_DETAIL not in browser.get(f"/operations/{op.pk}/").content.decode()

    as_operator = client_for(world, "oscar").get(f"/api/v1/operations/{op.pk}/").json()
    assert HOST_DETAIL in as_operator["operator_details"]["error"]
    browser.force_login(world.user("oscar"))
    assert HOST_DETAIL in browser.get(f"/operations/{op.pk}/").content.decode()


def test_it_does_not_tell_a_tenant_whether_another_holds_the_same_layers(
    world: World, settings: object, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    settings.BULKHEAD_STORE_DIR = store  # type: ignore[attr-defined]
    archive = write_docker_archive(build_image(busybox_layers()), tmp_path / "busybox.tar")
    with celery_worker(BULKHEAD_STORE_DIR=str(store)):
        first = import_archive(world, "alice", archive, world.acme, "1")
        second = import_archive(world, "bob", archive, world.globex, "1")
    assert first.state == second.state == "succeeded", (first.error, second.error)

    seen_by_alice = client_for(world, "alice").get(f"/api/v1/operations/{first.pk}/").json()
    seen_by_bob = client_for(world, "bob").get(f"/api/v1/operations/{second.pk}/").json()
    # Bob's import found every byte in the store already; what he reads is shaped and sized like
    # Alice's, who found nothing there.
    tenant_keys = {"image", "manifest_digest", "warnings"}
    assert set(seen_by_bob["result"]) == set(seen_by_alice["result"]) == tenant_keys
    assert "operator_details" not in seen_by_bob
    # Operators see what the store did.
    as_operator = client_for(world, "oscar").get(f"/api/v1/operations/{second.pk}/").json()
    assert as_operator["operator_details"]["layer_bytes_written"] == 0
    assert (
        client_for(world, "oscar")
        .get(f"/api/v1/operations/{first.pk}/")
        .json()["operator_details"]["layer_bytes_written"]
        > 0
    )


def test_it_answers_a_clear_503_when_the_store_has_no_room_for_an_upload(
    world: World, settings: object, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    settings.BULKHEAD_STORE_DIR = store  # type: ignore[attr-defined]
    archive = write_docker_archive(build_image(busybox_layers()), tmp_path / "busybox.tar")
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(store)], check=True)
    try:
        alice = client_for(world, "alice")
        response = post_archive(alice, archive, name="busybox", tag="1", tenant=world.acme)
        assert response.status_code == 503, response.content
        assert response.json()["error"]["code"] == "unavailable"
        assert not list((store / "ingest").glob("upload-*")), "the partial upload is removed"
        assert not Operation.objects.exists()
    finally:
        subprocess.run(["umount", "-l", str(store)], check=True)
