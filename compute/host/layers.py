"""A workload's image layers on this host: fetched from the portal when missing, unpacked by the store."""

from __future__ import annotations

from compute.host.context import HostContext, Progress
from compute.host.spec import ImageLayerRef, WorkloadSpec
from imaging.store import LayerSpec, LayerStore


class BlobUnavailable(RuntimeError):
    """The portal refused or failed to hand this host a blob it needs."""


def ensure_layers(ctx: HostContext, spec: WorkloadSpec, progress: Progress) -> list[str]:
    """Unpacked layer dirs of the workload's image, top-most first (overlayfs lowerdir order)."""
    layer_store = ctx.store()
    missing = [layer for layer in spec.layers if not layer_store.has_layer(layer.diff_id)]
    if missing:
        fetch_missing_blobs(ctx, layer_store, missing, progress)
        progress(20, f"Unpacking {len(missing)} layer(s)")
        layer_store.unpack_layers(
            [
                LayerSpec(blob_digest=layer.digest, media_type=layer.media_type, diff_id=layer.diff_id)
                for layer in missing
            ]
        )
    return [str(p) for p in reversed(layer_store.lower_dirs([layer.diff_id for layer in spec.layers]))]


def fetch_missing_blobs(
    ctx: HostContext, layer_store: LayerStore, layers: list[ImageLayerRef], progress: Progress
) -> int:
    """Blobs this host's store lacks, fetched from the portal with the host's own credential and
    verified by digest while they stream in (a host on another machine has no share of the portal's
    store). Without a portal configured (the portal's own machine) nothing is fetched."""
    local = ctx.local
    wanted = [layer for layer in layers if not layer_store.has_blob(layer.digest)]
    if not wanted or not local.remote:
        return 0
    import httpx

    fetched = 0
    with httpx.Client(
        base_url=local.portal_url, headers={"Authorization": f"Bearer {local.credential}"}, timeout=60
    ) as client:
        for number, layer in enumerate(wanted, start=1):
            progress(10, f"Fetching layer {number} of {len(wanted)} from the portal", force=True)
            with client.stream("GET", f"/api/v1/hosts/blobs/{layer.digest}/") as response:
                if response.status_code != 200:
                    raise BlobUnavailable(
                        f"The portal did not hand out the layer {layer.digest} ({response.status_code})."
                    )
                layer_store.ingest_chunks(
                    response.iter_bytes(1024 * 1024), digest=layer.digest, size=layer.size
                )
            fetched += 1
    return fetched
