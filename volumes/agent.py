"""The host side of volumes: make the pool match the volume rows of this host (runs on `host.<id>`).

Every step is idempotent (the pool's operations are) and every state change a conditional update, so a
task delivered twice, or run again after its worker was killed, converges.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from django.conf import settings

from compute.hosts import host_state_dir
from compute.models import Host, Workload
from compute.runtimes.volume_pool import VolumePool, ensure_embedded_pool, unmount_embedded_pool
from portal import events
from portal.errors import Explained
from volumes.choices import SnapshotState, VolumeState
from volumes.models import GIB, Snapshot, Volume, VolumeAttachment

log = logging.getLogger(__name__)

_ready_roots: set[Path] = set()


def embedded_pool_paths(host: Host) -> tuple[Path, Path]:
    """(image, mount point) of a host's embedded pool."""
    directory = host_state_dir(host)
    return directory / "volume-pool.img", directory / "volume-pool"


def pool_for(host: Host) -> VolumePool:
    """The host's pool, made and mounted on first use (embedded) or checked (an operator's directory)."""
    if settings.BULKHEAD_VOLUME_POOL:
        root = Path(settings.BULKHEAD_VOLUME_POOL)
        pool = VolumePool(root)
        if root not in _ready_roots:
            pool.check()
    else:
        image, root = embedded_pool_paths(host)
        pool = VolumePool(root)
        if root not in _ready_roots or not root.is_mount():
            ensure_embedded_pool(image, root, settings.BULKHEAD_VOLUME_POOL_GIB * GIB)
    _ready_roots.add(root)
    return pool


def pool_ready(host: Host) -> bool:
    """The host has a usable pool now (an operator's directory, or the embedded one mounted)."""
    if settings.BULKHEAD_VOLUME_POOL:
        return Path(settings.BULKHEAD_VOLUME_POOL).is_dir()
    _image, root = embedded_pool_paths(host)
    return root.is_mount()


def release_pool(host: Host) -> None:
    """Unmount the host's embedded pool (the agent's shutdown with --stop-workloads-on-exit; tests)."""
    if settings.BULKHEAD_VOLUME_POOL:
        return
    _image, root = embedded_pool_paths(host)
    unmount_embedded_pool(root)
    _ready_roots.discard(root)


def pool_facts(host: Host) -> dict[str, Any]:
    """Capacity and use of the host's pool, for host facts (and placement of volumes)."""
    pool = pool_for(host)
    capacity = pool.capacity()
    return {
        "kind": "btrfs",
        "embedded": not settings.BULKHEAD_VOLUME_POOL,
        "total_bytes": capacity.total_bytes,
        "used_bytes": capacity.used_bytes,
        "free_bytes": capacity.free_bytes,
    }


def report_pool(host: Host) -> dict[str, Any]:
    facts = pool_facts(host)
    fresh = Host.objects.get(pk=host.pk)
    Host.objects.filter(pk=host.pk).update(facts={**fresh.facts, "volume_pool": facts})
    return facts


def volume_paths(workload: Workload) -> list[dict[str, Any]]:
    """The workload's attachments with the host directories of their volumes (server values only)."""
    assert workload.host is not None
    attachments = list(
        VolumeAttachment.objects.filter(workload=workload).select_related("volume").order_by("path")
    )
    if not attachments:
        return []
    pool = pool_for(workload.host)
    mounts = []
    for index, attachment in enumerate(attachments):
        volume = attachment.volume
        if volume.host_id != workload.host_id or not pool.exists(volume.pool_name):
            raise VolumeUnavailable(f"The volume {volume.name} is not on this workload's host.")
        mounts.append(
            {
                "source": str(pool.volume_path(volume.pool_name)),
                "path": attachment.path,
                "read_only": attachment.read_only,
                "tag": f"bhvol{index}",
            }
        )
    return mounts


class VolumeUnavailable(Explained):
    """A workload's volume is not where it should be (told to the tenant)."""


def _publish(volume: Volume) -> None:
    fresh = Volume.objects.filter(pk=volume.pk).first()
    if fresh is not None:
        events.publish(fresh.tenant_id, fresh.as_event())


def _move(volume: Volume, expected: list[str], **changes: Any) -> bool:
    done = bool(Volume.objects.filter(pk=volume.pk, state__in=expected).update(**changes))
    if done:
        _publish(volume)
    return done


def refresh_usage(volume: Volume) -> int:
    from volumes.services import report_usage

    used = pool_for(volume.host).usage(volume.pool_name).used_bytes
    report_usage(volume.pk, used)
    return used


def create(volume: Volume, progress: Any) -> dict[str, Any]:
    progress(30, "Creating the volume on the pool", force=True)
    pool_for(volume.host).create(volume.pool_name, volume.size_bytes)
    _move(volume, [VolumeState.CREATING, VolumeState.FAILED], state=VolumeState.READY, status_message="")
    report_pool(volume.host)
    return {"state": VolumeState.READY, "size_bytes": volume.size_bytes}


def resize(volume: Volume, progress: Any) -> dict[str, Any]:
    progress(30, "Changing the volume's limit", force=True)
    pool_for(volume.host).resize(volume.pool_name, volume.size_bytes)
    _move(volume, [VolumeState.RESIZING, VolumeState.FAILED], state=VolumeState.READY, status_message="")
    return {"state": VolumeState.READY, "size_bytes": volume.size_bytes}


def delete(volume: Volume, progress: Any) -> dict[str, Any]:
    from volumes.services import forget_volume

    pool = pool_for(volume.host)
    snapshots = list(Snapshot.objects.filter(volume=volume))
    for index, snapshot in enumerate(snapshots):
        progress(10 + 60 * index / max(len(snapshots), 1), f"Deleting snapshot {snapshot.name}")
        pool.delete_snapshot(snapshot.pool_name)
    progress(80, "Deleting the volume's data", force=True)
    pool.delete(volume.pool_name)
    forget_volume(volume.pk)
    events.publish(volume.tenant_id, {"type": "volume", "id": str(volume.pk), "state": "deleted"})
    report_pool(volume.host)
    return {"deleted": True}


def snapshot(snap: Snapshot, progress: Any) -> dict[str, Any]:
    volume = snap.volume
    pool = pool_for(volume.host)
    progress(30, "Taking the snapshot", force=True)
    started = time.monotonic()
    pool.snapshot(volume.pool_name, snap.pool_name)
    seconds = time.monotonic() - started
    used = pool.snapshot_usage(snap.pool_name).used_bytes
    Snapshot.objects.filter(pk=snap.pk, state=SnapshotState.CREATING).update(
        state=SnapshotState.READY, used_bytes=used
    )
    events.publish(volume.tenant_id, Snapshot.objects.get(pk=snap.pk).as_event())
    return {"state": SnapshotState.READY, "seconds": round(seconds, 4)}


def restore(snap: Snapshot, progress: Any) -> dict[str, Any]:
    volume = snap.volume
    progress(30, f"Restoring {volume.name} to {snap.name}", force=True)
    pool_for(volume.host).restore(volume.pool_name, snap.pool_name, volume.size_bytes)
    _move(volume, [VolumeState.RESTORING, VolumeState.FAILED], state=VolumeState.READY, status_message="")
    refresh_usage(volume)
    return {"state": VolumeState.READY, "snapshot": snap.name}


def clone(volume: Volume, snap: Snapshot, progress: Any) -> dict[str, Any]:
    progress(30, f"Cloning {snap.name}", force=True)
    pool_for(volume.host).clone(snap.pool_name, volume.pool_name, volume.size_bytes)
    _move(volume, [VolumeState.CREATING, VolumeState.FAILED], state=VolumeState.READY, status_message="")
    refresh_usage(volume)
    return {"state": VolumeState.READY}


def delete_snapshot(snap: Snapshot, progress: Any) -> dict[str, Any]:
    progress(30, "Deleting the snapshot", force=True)
    pool_for(snap.volume.host).delete_snapshot(snap.pool_name)
    Snapshot.objects.filter(pk=snap.pk).delete()
    events.publish(snap.volume.tenant_id, {"type": "snapshot", "id": str(snap.pk), "state": "deleted"})
    return {"deleted": True}


def fail(volume: Volume | None, snap: Snapshot | None, message: str) -> None:
    if snap is not None and snap.state == SnapshotState.CREATING:
        Snapshot.objects.filter(pk=snap.pk).update(state=SnapshotState.FAILED, status_message=message[:500])
    if volume is not None:
        _move(
            volume,
            [VolumeState.CREATING, VolumeState.RESIZING, VolumeState.RESTORING],
            state=VolumeState.FAILED,
            status_message=message[:500],
        )


def sample_usage(host: Host) -> None:
    """Refresh the used bytes of this host's volumes (the agent loop, every sample interval)."""
    from volumes.services import report_usage

    volumes = list(Volume.objects.filter(host=host, state=VolumeState.READY))
    if not volumes:
        return
    usage = pool_for(host).all_usage()
    for volume in volumes:
        found = usage.get(volume.pool_name)
        if found is not None and found.used_bytes != volume.used_bytes:
            report_usage(volume.pk, found.used_bytes)
