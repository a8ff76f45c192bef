"""Commit: a workload's captured changes become a new layer on top of its image, as a new tenant image."""

from __future__ import annotations

import json
from typing import Any

from django.db import transaction

from compute.host import agent
from compute.host.context import Progress, host_context
from compute.models import Workload
from imaging.models import Image, ImageLayer, Layer, TenantLayer
from portal.errors import Conflict
from tenants import audit, quota
from tenants.actors import Actor

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _image_config(base: Image, diff_ids: list[str]) -> dict[str, Any]:
    runtime = base.config or {}
    config: dict[str, Any] = {
        "Env": runtime.get("env") or [],
        "Entrypoint": runtime.get("entrypoint"),
        "Cmd": runtime.get("cmd"),
        "WorkingDir": runtime.get("workdir") or "",
        "User": runtime.get("user") or "",
    }
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {k: v for k, v in config.items() if v not in (None, "")},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


def commit(workload: Workload, *, name: str, tag: str, actor_user: Any, progress: Progress) -> Image:
    """Write the upper dir as a layer (Rust: whiteouts, compression, hashing), then the image rows.

    Runs in the worker of the workload's host and writes the rows there: the portal's own machine only
    (a host on its own machine has no database; see NOTES.md, session 14)."""
    ctx = host_context(workload.host_id)
    layer_store = ctx.store()
    progress(20, "Writing the changes as a layer", force=True)
    upper = agent.upper_dir(ctx, workload)
    committed = layer_store.diff_upper(
        upper, compression="zstd", id_shift=agent.upper_id_shift(ctx, workload)
    )
    base_layers = [
        il.layer for il in workload.image.image_layers.select_related("layer").order_by("position")
    ]
    diff_ids = [layer.diff_id for layer in base_layers] + [committed.diff_id]
    config_bytes = json.dumps(_image_config(workload.image, diff_ids), sort_keys=True).encode()
    config_digest, config_size = layer_store.ingest_bytes(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            for layer in base_layers
        ]
        + [{"mediaType": committed.media_type, "digest": committed.blob_digest, "size": committed.size}],
    }
    manifest_digest, _ = layer_store.ingest_bytes(json.dumps(manifest, sort_keys=True).encode())
    progress(70, "Unpacking the new layer")
    from imaging.store import LayerSpec

    layer_store.unpack_layers(
        [
            LayerSpec(
                blob_digest=committed.blob_digest, media_type=committed.media_type, diff_id=committed.diff_id
            )
        ]
    )
    with transaction.atomic():
        tenant = workload.tenant
        if Image.objects.filter(tenant=tenant, name=name, tag=tag).exists():
            raise Conflict(f"The image {name}:{tag} exists already.")
        layer, _ = Layer.objects.get_or_create(
            digest=committed.blob_digest,
            defaults={
                "diff_id": committed.diff_id,
                "size": committed.size,
                "media_type": committed.media_type,
            },
        )
        layers = [*base_layers, layer]
        held = set(
            TenantLayer.objects.filter(tenant=tenant, layer__in=layers).values_list("layer_id", flat=True)
        )
        new = [lyr for lyr in layers if lyr.pk not in held]
        quota.allocate(tenant, image_bytes=sum(lyr.size for lyr in new))
        TenantLayer.objects.bulk_create([TenantLayer(tenant=tenant, layer=lyr) for lyr in new])
        image = Image.objects.create(
            tenant=tenant,
            name=name,
            tag=tag,
            manifest_digest=manifest_digest,
            config_digest=config_digest,
            config=workload.image.config,
            size=sum(lyr.size for lyr in layers),
            source="commit",
            source_reference=f"workload {workload.pk}",
        )
        ImageLayer.objects.bulk_create(
            [ImageLayer(image=image, layer=lyr, position=i) for i, lyr in enumerate(layers)]
        )
        audit.record(
            Actor(user=actor_user, label_override="" if actor_user else "agent"),
            "image.commit",
            image,
            details={"workload": str(workload.pk), "layer": committed.blob_digest},
        )
    return image
