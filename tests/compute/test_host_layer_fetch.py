"""A host without an image's layers fetches their blobs from the portal's registry with its own
credential and unpacks each one as soon as its blob has landed, not once all have: a layer whose blob
came is unpacked even when another layer's never comes (the retry has only that one left to fetch)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from compute import hosts
from compute.host import config, layers
from compute.host.context import HostContext, noop_progress
from compute.host.spec import ImageLayerRef, WorkloadSpec
from compute.models import Workload
from imaging.models import repository_name
from imaging.store import LayerStore
from tenants.actors import Actor
from tests.compute.conftest import create, make_host
from tests.conftest import World
from tests.processes import serve_registry

pytestmark = pytest.mark.django_db(transaction=True)

NEVER_PUSHED = "sha256:" + "0" * 64


def image_layers(image: Any) -> list[ImageLayerRef]:
    return [
        ImageLayerRef(
            digest=il.layer.digest,
            diff_id=il.layer.diff_id,
            media_type=il.layer.media_type,
            size=il.layer.size,
        )
        for il in image.image_layers.order_by("position").select_related("layer")
    ]


def test_it_unpacks_the_layer_whose_blob_landed_when_another_layers_blob_is_refused(
    world: World, busybox: Any, store_dir: Path
) -> None:
    host = make_host("bht-layer-fetch")
    # A workload of the image placed on the host (no agent runs it): the registry hands the host its blobs.
    assert create(world, "mia", name="fetching", image=str(busybox.pk)).status_code == 202
    assert Workload.objects.get(name="fetching").host == host
    secret = hosts.issue_host_credential(actor=Actor.system("test"), host=host)
    host_store = store_dir.with_name(store_dir.name + "-host")
    base = image_layers(busybox)[0]
    # The portal names a layer its registry never had (a blob removed, a broken push): refused, 404.
    missing = ImageLayerRef(digest=NEVER_PUSHED, diff_id=NEVER_PUSHED, media_type=base.media_type, size=1)
    spec = cast(
        WorkloadSpec, SimpleNamespace(layers=[base, missing], image_repository=repository_name(busybox))
    )
    try:
        with serve_registry(store_dir) as portal:
            local = dataclasses.replace(
                config.local(), store_dir=host_store, portal_url=f"http://{portal}", credential=secret
            )
            ctx = HostContext(str(host.pk), local)
            with pytest.raises(layers.BlobUnavailable):
                layers.ensure_layers(ctx, spec, noop_progress)
        assert LayerStore(str(host_store)).has_layer(base.diff_id)
        assert not LayerStore(str(host_store)).has_blob(NEVER_PUSHED)
    finally:
        shutil.rmtree(host_store, ignore_errors=True)
