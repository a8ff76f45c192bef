"""The host side of volumes and snapshots: make the pool match what the portal asks (issue 16's boundary).

No Django here. An operation's work comes from the portal as a spec (`PortalLink.volume_work`: pool
names, sizes, states, all server-made), and every change is reported back through the host API
(`report_volume`, `report_snapshot`), where the portal checks that the object is on this host and makes
the conditional update. Every step is idempotent (the pool's are), so a task run again after its worker
was killed converges; the kill points (`failpoint`) are where the kill-point tests stop a worker.

A worker holds `operation_lock(op)` (a flock on the host) from before it claims an operation until it has
reported its end; the agent's `resume_interrupted` reads a free lock on a running operation as "its
worker died" and has the portal queue it again (or fail it, after `MAX_RESUMES`), so a killed volume or
backup operation converges in seconds instead of after the broker's visibility timeout (an hour).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from compute.runtimes.volume_pool import VolumePool, ensure_embedded_pool, unmount_embedded_pool
from portal.failpoints import failpoint

log = logging.getLogger(__name__)

GIB = 1024**3
OPERATION_ID = re.compile(r"^[0-9a-f-]{32,36}$")

# The operations whose host work lives here and in compute.host.backups (what `resume_interrupted` resumes).
VOLUME_KINDS = (
    "volume.create",
    "volume.resize",
    "volume.delete",
    "snapshot.create",
    "snapshot.restore",
    "snapshot.clone",
    "snapshot.delete",
    "backup.create",
    "backup.restore",
)


class Progress(Protocol):
    def __call__(self, percent: float, message: str = "", *, force: bool = False) -> None: ...


@dataclass(frozen=True)
class PoolPlace:
    """Where a host's pool is: an operator's mounted btrfs directory, or the embedded loop image."""

    directory: Path | None
    image: Path
    mount_point: Path
    embedded_bytes: int

    @property
    def root(self) -> Path:
        return self.directory if self.directory is not None else self.mount_point


_ready_roots: set[Path] = set()


def pool_for(place: PoolPlace) -> VolumePool:
    """The host's pool, made and mounted on first use (embedded) or checked (an operator's directory)."""
    pool = VolumePool(place.root)
    if place.directory is not None:
        if place.root not in _ready_roots:
            pool.check()
    elif place.root not in _ready_roots or not place.root.is_mount():
        ensure_embedded_pool(place.image, place.mount_point, place.embedded_bytes)
    _ready_roots.add(place.root)
    return pool


def pool_ready(place: PoolPlace) -> bool:
    """The host has a usable pool now (an operator's directory, or the embedded one mounted)."""
    return place.root.is_dir() if place.directory is not None else place.mount_point.is_mount()


def release_pool(place: PoolPlace) -> None:
    """Unmount the embedded pool (make run's Ctrl-C; tests); the loop device goes with it."""
    if place.directory is None:
        unmount_embedded_pool(place.mount_point)
        _ready_roots.discard(place.root)


def pool_facts(place: PoolPlace) -> dict[str, Any]:
    capacity = pool_for(place).capacity()
    return {
        "kind": "btrfs",
        "embedded": place.directory is None,
        "total_bytes": capacity.total_bytes,
        "used_bytes": capacity.used_bytes,
        "free_bytes": capacity.free_bytes,
    }


def report_pool(link: Any, place: PoolPlace) -> dict[str, Any]:
    """Pool capacity and use, and every volume's used bytes, to the portal (the agent loop)."""
    facts = pool_facts(place)
    link.report_volume_pool(facts)
    usage = pool_for(place).all_usage()
    if usage:
        link.report_volume_usage({name: found.used_bytes for name, found in usage.items()})
    return facts


# ---------------------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def operation_lock(lock_dir: Path, op_id: str, *, blocking: bool = True) -> Iterator[bool]:
    """Held by the worker running an operation (the kernel drops it when that process dies). Yields
    whether it is held: False only when `blocking` is off and another process holds it."""
    if not OPERATION_ID.match(str(op_id)):
        raise ValueError(f"not an operation id: {op_id!r}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{op_id}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        # The file stays (empty): removing it would let a waiter and a newcomer hold two locks.
        yield True
    finally:
        os.close(fd)


def resume_interrupted(link: Any, lock_dir: Path) -> list[str]:
    """Volume and backup operations of this host that are `running` with no live worker (their lock
    is free): the portal queues each again (the work is idempotent) or, past its resume limit, fails
    it and leaves the object in a state the tenant can act on. Returns the ids handed back."""
    handed: list[str] = []
    for op in link.volume_operations():
        op_id = str(op.get("id", ""))
        if not OPERATION_ID.match(op_id) or op.get("kind") not in VOLUME_KINDS:
            continue
        with operation_lock(lock_dir, op_id, blocking=False) as free:
            if not free:
                continue  # a live worker runs it
            answer = link.resume_volume_operation(op_id)
            if answer.get("resumed") or answer.get("failed"):
                handed.append(op_id)
    return handed


# ---------------------------------------------------------------------------------------- the work
def run(link: Any, place: PoolPlace, work: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Do one volume or snapshot operation as the portal's spec says."""
    kind = work["kind"]
    volume, snap = work.get("volume"), work.get("snapshot")
    if kind == "volume.delete":
        return delete(link, place, work, progress)
    if kind == "snapshot.delete":
        return delete_snapshot(link, place, volume, snap, progress)
    if volume is None:
        return {"skipped": "volume deleted"}
    if kind == "volume.create":
        return create(link, place, volume, progress)
    if kind == "volume.resize":
        return resize(link, place, volume, progress)
    if snap is None:
        fail(link, volume, None, "The snapshot was deleted before it was used.")
        return {"skipped": "snapshot deleted"}
    if kind == "snapshot.create":
        return snapshot(link, place, volume, snap, progress)
    if kind == "snapshot.restore":
        return restore(link, place, volume, snap, progress)
    if kind == "snapshot.clone":
        return clone(link, place, volume, snap, progress)
    raise ValueError(f"not a volume operation: {kind}")


def _ready(link: Any, place: PoolPlace, volume: dict[str, Any]) -> None:
    link.report_volume(volume["id"], "ready")
    refresh_usage(link, place, volume)


def refresh_usage(link: Any, place: PoolPlace, volume: dict[str, Any]) -> int:
    used = pool_for(place).usage(volume["pool_name"]).used_bytes
    link.report_volume(volume["id"], "usage", used_bytes=used)
    return used


def create(link: Any, place: PoolPlace, volume: dict[str, Any], progress: Progress) -> dict[str, Any]:
    progress(30, "Creating the volume on the pool", force=True)
    pool_for(place).create(volume["pool_name"], volume["size_bytes"])
    failpoint("volume.create.made")
    _ready(link, place, volume)
    return {"state": "ready", "size_bytes": volume["size_bytes"]}


def resize(link: Any, place: PoolPlace, volume: dict[str, Any], progress: Progress) -> dict[str, Any]:
    progress(30, "Changing the volume's limit", force=True)
    pool_for(place).resize(volume["pool_name"], volume["size_bytes"])
    failpoint("volume.resize.limited")
    link.report_volume(volume["id"], "ready")
    return {"state": "ready", "size_bytes": volume["size_bytes"]}


def delete(link: Any, place: PoolPlace, work: dict[str, Any], progress: Progress) -> dict[str, Any]:
    volume = work.get("volume")
    if volume is None:
        return {"skipped": "already deleted"}
    pool = pool_for(place)
    snapshots = list(work.get("snapshots") or [])
    for index, name in enumerate(snapshots):
        progress(10 + 60 * index / max(len(snapshots), 1), "Deleting the volume's snapshots")
        pool.delete_snapshot(name)
    failpoint("volume.delete.snapshots_gone")
    progress(80, "Deleting the volume's data", force=True)
    pool.delete(volume["pool_name"])
    pool.clear_stale_qgroups()  # a delete killed between a subvolume and its qgroup left one
    failpoint("volume.delete.data_gone")
    link.report_volume(volume["id"], "deleted")
    return {"deleted": True}


def snapshot(
    link: Any, place: PoolPlace, volume: dict[str, Any], snap: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    pool = pool_for(place)
    progress(30, "Taking the snapshot", force=True)
    started = time.monotonic()
    pool.snapshot(volume["pool_name"], snap["pool_name"])
    seconds = time.monotonic() - started
    failpoint("snapshot.create.taken")
    used = pool.snapshot_usage(snap["pool_name"]).used_bytes
    link.report_snapshot(snap["id"], "ready", used_bytes=used)
    return {"state": "ready", "seconds": round(seconds, 4)}


def restore(
    link: Any, place: PoolPlace, volume: dict[str, Any], snap: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    progress(30, "Restoring the volume to its snapshot", force=True)
    pool_for(place).restore(volume["pool_name"], snap["pool_name"], volume["size_bytes"])
    failpoint("snapshot.restore.restored")
    _ready(link, place, volume)
    return {"state": "ready", "snapshot": snap["id"]}


def clone(
    link: Any, place: PoolPlace, volume: dict[str, Any], snap: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    progress(30, "Cloning the snapshot", force=True)
    pool_for(place).clone(snap["pool_name"], volume["pool_name"], volume["size_bytes"])
    failpoint("snapshot.clone.made")
    _ready(link, place, volume)
    return {"state": "ready"}


def delete_snapshot(
    link: Any,
    place: PoolPlace,
    volume: dict[str, Any] | None,
    snap: dict[str, Any] | None,
    progress: Progress,
) -> dict[str, Any]:
    if snap is None:
        return {"skipped": "already deleted"}
    progress(30, "Deleting the snapshot", force=True)
    pool = pool_for(place)
    pool.delete_snapshot(snap["pool_name"])
    pool.clear_stale_qgroups()
    failpoint("snapshot.delete.gone")
    link.report_snapshot(snap["id"], "deleted")
    return {"deleted": True}


def fail(link: Any, volume: dict[str, Any] | None, snap: dict[str, Any] | None, message: str) -> None:
    """Tell the portal the work failed: a snapshot being made and a volume being made, resized or
    restored become `failed` with the tenant-readable message (the portal ignores other states)."""
    if snap is not None:
        link.report_snapshot(snap["id"], "failed", message=message[:500])
    if volume is not None:
        link.report_volume(volume["id"], "failed", message=message[:500])


def work_objects(work: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """What a failed operation's report is about: its volume, and its snapshot when it makes one."""
    snap = work.get("snapshot") if work.get("kind") == "snapshot.create" else None
    not_the_volume = ("snapshot.create", "snapshot.delete", "backup.create")
    volume = None if work.get("kind") in not_the_volume else work.get("volume")
    return volume, snap
