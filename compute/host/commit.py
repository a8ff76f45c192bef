"""Commit on the host: a workload's captured changes become a layer, uploaded to the portal, which
records the new image (`POST hosts/self/workloads/<id>/commit/`). The host writes no row."""

from __future__ import annotations

from typing import Any

from compute.host.context import HostContext, Progress
from compute.host.drivers import driver_for
from compute.host.link import HostApiError
from compute.host.spec import WorkloadSpec
from portal.errors import Explained

# The portal's refusals of a commit are written for the tenant (quota, a name taken, a layer refused).
TENANT_READABLE = (400, 403, 409)


class CommitRefused(Explained):
    """The portal did not take the commit; its reason is the tenant's to read."""


def commit_changes(ctx: HostContext, spec: WorkloadSpec, op_id: Any, progress: Progress) -> dict[str, Any]:
    """Write the changes as a zstd layer (Rust: whiteouts, ids seen inside, hashing), upload its blob
    with the host's credential, then report the commit; the portal answers the new image's id."""
    layer_store = ctx.store()
    driver = driver_for(spec.isolation)
    progress(20, "Writing the changes as a layer", force=True)
    committed = layer_store.diff_upper(
        driver.upper_dir(ctx, spec), compression="zstd", id_shift=driver.upper_id_shift(ctx, spec)
    )
    layer = {
        "digest": committed.blob_digest,
        "diff_id": committed.diff_id,
        "size": committed.size,
        "media_type": committed.media_type,
    }
    try:
        progress(50, "Uploading the layer to the portal", force=True)
        ctx.link.upload_commit_layer(
            spec.id,
            op_id,
            committed.blob_digest,
            committed.size,
            layer_store.blob_path(committed.blob_digest),
        )
        progress(80, "Recording the image", force=True)
        answer = ctx.link.report_commit(spec.id, op_id, layer)
    except HostApiError as error:
        if error.status in TENANT_READABLE and error.message:
            raise CommitRefused(error.message) from error
        raise
    return {"image": answer.get("image")}
