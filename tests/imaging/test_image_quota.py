"""Image storage is reserved before a byte is fetched or written: what cannot fit is refused up front.

Played as a tenant near its quota would: pulling, importing or uploading an image larger than what is
left. The registry is a real one (Debian's docker-registry); its access log shows what was fetched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from imaging.models import Image, TenantLayer
from imaging.services import get_store
from portal import operations
from portal.models import Operation
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from tests.imaging.images import (
    BuiltImage,
    build_image,
    busybox_layers,
    post_archive,
    run_inline,
    store_dir,
    write_layout,
    write_oci_archive,
)
from tests.imaging.test_images_registry import Registry, pull, start_registry, stop

__all__ = ["store_dir"]


class LoggedRegistry(Registry):
    log: Path

    def blob_gets(self, since: int = 0) -> list[str]:
        """The blob GETs the registry answered (its access log), after byte offset ``since``."""
        text = self.log.read_bytes()[since:].decode(errors="replace")
        return re.findall(r'"GET (/v2/[^ ]+/blobs/sha256:[0-9a-f]+) HTTP', text)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedRegistry]:
    tmp = tmp_path_factory.mktemp("quota-registry")
    proc, host = start_registry(tmp)
    logged = LoggedRegistry(host)
    logged.log = tmp / "registry.log"
    yield logged
    stop(proc)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuiltImage, Path]:
    built = build_image(busybox_layers("quota"))
    return built, write_layout(built, tmp_path_factory.mktemp("quota-image") / "layout")


def layer_bytes(built: BuiltImage) -> int:
    return sum(len(layer.blob) for layer in built.layers)


def used_bytes(world: World) -> int:
    return Quota.objects.get(tenant=world.acme).used_image_bytes


@pytest.mark.django_db
def test_it_refuses_a_pull_beyond_the_quota_before_fetching_a_blob(
    world: World, store_dir: Path, registry: LoggedRegistry, image: tuple[BuiltImage, Path], settings: Any
) -> None:
    built, layout = image
    registry.push(layout, "quota/big:1")
    settings.BULKHEAD_REGISTRY_ALLOWLIST = [registry.host]
    Quota.objects.filter(tenant=world.acme).update(image_bytes=layer_bytes(built) - 1)
    log_offset = registry.log.stat().st_size

    response = pull(client_for(world, "mia"), f"{registry.host}/quota/big:1", world.acme)
    op = run_inline(response.json()["id"])

    assert op.state == "failed"
    assert "image storage" in op.error
    assert registry.blob_gets(since=log_offset) == []  # not even the config
    assert not any(get_store().has_blob(layer.digest) for layer in built.layers)
    assert not Image.objects.exists() and not TenantLayer.objects.exists()
    assert used_bytes(world) == 0
    assert "reserved_quota" not in Operation.objects.get(pk=op.pk).params
    assert AuditEntry.objects.filter(action="image.pull", outcome="failed").exists()


@pytest.mark.django_db
def test_it_charges_a_pull_exactly_what_it_adds(
    world: World, store_dir: Path, registry: LoggedRegistry, image: tuple[BuiltImage, Path], settings: Any
) -> None:
    built, layout = image
    registry.push(layout, "quota/fits:1")
    settings.BULKHEAD_REGISTRY_ALLOWLIST = [registry.host]
    Quota.objects.filter(tenant=world.acme).update(image_bytes=layer_bytes(built))
    client = client_for(world, "mia")

    first = run_inline(pull(client, f"{registry.host}/quota/fits:1", world.acme).json()["id"])
    # The same layers again under another tag: nothing new, nothing reserved, fits in a full quota.
    second = run_inline(pull(client, f"{registry.host}/quota/fits:1", world.acme, tag="2").json()["id"])

    assert (first.state, second.state) == ("succeeded", "succeeded"), (first.error, second.error)
    assert used_bytes(world) == layer_bytes(built)
    assert all("reserved_quota" not in op.params for op in Operation.objects.all())


@pytest.mark.django_db
def test_it_refuses_an_upload_larger_than_the_quota_left_and_keeps_nothing(
    world: World, store_dir: Path, image: tuple[BuiltImage, Path], tmp_path: Path
) -> None:
    Quota.objects.filter(tenant=world.acme).update(image_bytes=1000)
    archive = write_oci_archive(image[0], tmp_path / "big.tar")

    response = post_archive(client_for(world, "mia"), archive, name="big", tag="1", tenant=world.acme)

    assert response.status_code == 409, response.json()
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert not Operation.objects.exists()
    assert not list((store_dir / "ingest").glob("upload-*"))
    assert used_bytes(world) == 0


@pytest.mark.django_db
def test_it_refuses_an_import_beyond_the_quota_before_writing_a_layer(
    world: World, store_dir: Path, image: tuple[BuiltImage, Path]
) -> None:
    built, layout = image
    Quota.objects.filter(tenant=world.acme).update(image_bytes=layer_bytes(built) - 1)
    # An operator's directory import into the tenant: no upload size to check first.
    response = client_for(world, "oscar").post(
        "/api/v1/images/import/",
        {"directory": str(layout), "name": "big", "tag": "1", "tenant": str(world.acme.pk)},
        format="json",
    )
    assert response.status_code == 202, response.json()

    op = run_inline(response.json()["id"])

    assert op.state == "failed"
    assert "image storage" in op.error
    assert not any(get_store().has_blob(layer.digest) for layer in built.layers)
    assert used_bytes(world) == 0


@pytest.mark.django_db
def test_it_gives_back_what_a_lost_import_had_reserved(world: World) -> None:
    Quota.objects.filter(tenant=world.acme).update(used_image_bytes=5000)
    stale = timezone.now() - timedelta(hours=1)
    op = Operation.objects.create(
        kind="image.pull",
        tenant=world.acme,
        state="running",
        queue="default",
        started_at=stale,
        heartbeat_at=stale,
        params={"reference": "r/x:1", "reserved_quota": {"image_bytes": 4000}},
    )

    operations.fail_lost()
    operations.fail_lost()  # a second sweep gives nothing back twice

    assert Operation.objects.get(pk=op.pk).state == "failed"
    assert used_bytes(world) == 1000
