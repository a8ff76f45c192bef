"""A workload's image layers on this host: fetched from the portal when missing, unpacked by the store."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from compute.host.context import HostContext, Progress
from compute.host.link import HostApiClient
from compute.host.spec import ImageLayerRef, WorkloadSpec
from imaging.store import LayerSpec, LayerStore, StoreError

# Blobs fetched at once (each over a kept-alive connection of the process's client).
PARALLEL_FETCHES = 4
# A fetch shorter than this shows no progress: a report would cost more than the wait it explains.
PROGRESS_AFTER_SECONDS = 0.25


class BlobUnavailable(RuntimeError):
    """The portal refused or failed to hand this host a blob it needs."""


def ensure_layers(ctx: HostContext, spec: WorkloadSpec, progress: Progress) -> list[str]:
    """Unpacked layer dirs of the workload's image, top-most first (overlayfs lowerdir order)."""
    layer_store = ctx.store()
    missing = [layer for layer in spec.layers if not layer_store.has_layer(layer.diff_id)]
    if missing:
        with progress_when_slow(progress, 10, f"Fetching and unpacking {len(missing)} layer(s)"):
            fetch_missing_blobs(ctx, layer_store, spec.image_repository, missing, progress)
            layer_store.unpack_layers(
                [
                    LayerSpec(blob_digest=layer.digest, media_type=layer.media_type, diff_id=layer.diff_id)
                    for layer in missing
                ]
            )
    return [str(p) for p in reversed(layer_store.lower_dirs([layer.diff_id for layer in spec.layers]))]


def present_lower_dirs(ctx: HostContext, spec: WorkloadSpec) -> list[str] | None:
    """`ensure_layers`' answer when every layer is unpacked here already; None (nothing fetched or
    unpacked) otherwise, or when the store cannot stack them (`ensure_layers` says why)."""
    layer_store = ctx.store()
    if not all(layer_store.has_layer(layer.diff_id) for layer in spec.layers):
        return None
    try:
        return [str(p) for p in reversed(layer_store.lower_dirs([layer.diff_id for layer in spec.layers]))]
    except StoreError:
        return None


@contextmanager
def progress_when_slow(progress: Progress, percent: float, message: str) -> Iterator[None]:
    """Report `message` (forced) only if the block is still running after `PROGRESS_AFTER_SECONDS`."""
    timer = threading.Timer(PROGRESS_AFTER_SECONDS, lambda: progress(percent, message, force=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def fetch_missing_blobs(
    ctx: HostContext,
    layer_store: LayerStore,
    repository: str,
    layers: list[ImageLayerRef],
    progress: Progress,
) -> int:
    """Blobs this host's store lacks, fetched from the portal's registry (`/v2/<repository>/blobs/…`)
    with the host's own credential and verified by digest while they stream in (a host on another
    machine has no share of the portal's store); several at once over the process's kept-alive
    connections. Without a portal configured (the portal's own machine) nothing is fetched."""
    local = ctx.local
    wanted = [layer for layer in layers if not layer_store.has_blob(layer.digest)]
    if not wanted or not local.remote:
        return 0
    if not REPOSITORY_RE.match(repository):
        raise BlobUnavailable("The portal named no registry repository for the image's layers.")
    link = ctx.link
    if not isinstance(link, HostApiClient):  # remote (portal URL and credential) registers the HTTP link
        raise BlobUnavailable("This host has no HTTP link to the portal to fetch layers through.")

    def fetch(layer: ImageLayerRef) -> None:
        # The link's own client: its connections are warm, its TLS context made.
        with link.blob(repository, layer.digest) as response:
            if response.status_code != 200:
                raise BlobUnavailable(
                    f"The portal did not hand out the layer {layer.digest} ({response.status_code})."
                )
            layer_store.ingest_chunks(response.iter_bytes(1024 * 1024), digest=layer.digest, size=layer.size)

    if len(wanted) == 1:
        fetch(wanted[0])
    else:
        with ThreadPoolExecutor(max_workers=min(PARALLEL_FETCHES, len(wanted))) as pool:
            for done in [pool.submit(fetch, layer) for layer in wanted]:
                done.result()  # the first failure is the create's
    return len(wanted)


# `<tenant>/<name>` as the registry names repositories: never a path of the host's choosing.
_PART = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_PART}(?:/{_PART})+$")
