"""A host's volume pool: volumes as btrfs subvolumes with qgroup limits, snapshots as btrfs snapshots.

Why btrfs (measured on the build machine, kernel 6.18, NOTES.md "Session 13: h-vol"): XFS project quotas
were the first choice but this kernel has no XFS quota support ("quota support not available in this
kernel" at `mount -o prjquota`); btrfs gives a kernel-enforced limit per volume (a qgroup on its
subvolume: a write past it fails inside the workload, the pool and the host untouched) and snapshots
that are one ioctl whatever the volume holds (read-only snapshot of 10 GiB or of 10,000 files: ~7 ms),
clones and restores the same way, and usage from the qgroup counters. None of it walks or mounts
anything a tenant wrote: the host only creates, snapshots, renames and deletes subvolumes by their
server-generated names, and reads counters.

Layout under the pool's root: `volumes/vol-<hex>` (subvolumes, attached to workloads) and
`snapshots/snap-<hex>` (read-only snapshots). Names come from the server (`vol-`/`snap-` + a UUID's
hex), checked here before any use.

This module imports no Django: the host side (compute.host.volumes) gives it names and sizes. Its steps
carry kill points (`failpoint("pool.…")`) that the kill-point tests stop a worker at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from portal.failpoints import failpoint

VOLUME_NAME = re.compile(r"^vol-[0-9a-f]{32}$")
SNAPSHOT_NAME = re.compile(r"^snap-[0-9a-f]{32}$")
# Suffixes of the steps of a restore and a clone (see restore()); never a name the server makes.
_NEW = ".new"
_OLD = ".old"
_MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"


class VolumePoolError(RuntimeError):
    pass


@dataclass(frozen=True)
class VolumeUsage:
    used_bytes: int
    limit_bytes: int | None


@dataclass(frozen=True)
class PoolCapacity:
    total_bytes: int
    free_bytes: int
    used_bytes: int


def _btrfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("btrfs")
    if binary is None:
        raise VolumePoolError("btrfs-progs is not installed (apt-get install btrfs-progs)")
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise VolumePoolError(
            f"btrfs {' '.join(args[:2])} failed: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result


def _checked_volume(name: str) -> str:
    if not VOLUME_NAME.match(name):
        raise VolumePoolError(f"not a volume name: {name!r}")
    return name


def _checked_snapshot(name: str) -> str:
    if not SNAPSHOT_NAME.match(name):
        raise VolumePoolError(f"not a snapshot name: {name!r}")
    return name


def _is_subvolume(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    # A btrfs subvolume's root directory is inode 256.
    return st.st_ino == 256 and (st.st_mode & 0o170000) == 0o040000


def ensure_embedded_pool(image: Path, mount_point: Path, size_bytes: int) -> None:
    """A loop-mounted btrfs image with quotas (make run's default pool), made and mounted if needed.

    The image is sparse; only the host's kernel ever writes it (tenants write files through a bind
    mount or virtiofsd), so mounting it crosses no trust boundary. nosuid,nodev: a set-id file or a
    device node made by a workload means nothing on the host.
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    os.chmod(mount_point, 0o700)
    if os.path.ismount(mount_point):
        _ensure_layout(mount_point)
        return
    if not image.exists():
        image.parent.mkdir(parents=True, exist_ok=True)
        tmp = image.with_name(image.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.truncate(size_bytes)
        mkfs = shutil.which("mkfs.btrfs")
        if mkfs is None:
            raise VolumePoolError("btrfs-progs is not installed (apt-get install btrfs-progs)")
        subprocess.run(
            [mkfs, "-q", "-f", "-L", "bulkhead-volumes", str(tmp)], check=True, capture_output=True
        )
        os.rename(tmp, image)
    subprocess.run(
        ["mount", "-t", "btrfs", "-o", _MOUNT_OPTIONS, str(image), str(mount_point)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    _ensure_layout(mount_point)


def unmount_embedded_pool(mount_point: Path) -> None:
    """Unmount the pool (the loop device goes with it: mount made it autoclear)."""
    if os.path.ismount(mount_point):
        subprocess.run(["umount", str(mount_point)], check=True, capture_output=True, timeout=60)


def _ensure_layout(root: Path) -> None:
    for sub in ("volumes", "snapshots"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    # Quotas on (idempotent): they are what limits a volume.
    if not _quota_enabled(root):
        _btrfs("quota", "enable", str(root))


def _quota_enabled(root: Path) -> bool:
    return _btrfs("qgroup", "show", str(root), check=False).returncode == 0


class VolumePool:
    """Volumes and snapshots on one btrfs filesystem (a mounted directory with quotas enabled)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def check(self) -> None:
        """The pool is usable: a btrfs filesystem with our layout and quotas enabled."""
        if not self.root.is_dir():
            raise VolumePoolError(f"volume pool {self.root} does not exist")
        _ensure_layout(self.root)

    def volume_path(self, name: str) -> Path:
        return self.root / "volumes" / _checked_volume(name)

    def snapshot_path(self, name: str) -> Path:
        return self.root / "snapshots" / _checked_snapshot(name)

    # ------------------------------------------------------------------ volumes
    def create(self, name: str, size_bytes: int) -> None:
        """Make the volume (idempotent): an empty subvolume whose root belongs to the workload's root."""
        path = self.volume_path(name)
        if not _is_subvolume(path):
            _btrfs("subvolume", "create", str(path))
            failpoint("pool.create.subvolume")
        self._limit(path, size_bytes)

    def exists(self, name: str) -> bool:
        return _is_subvolume(self.volume_path(name))

    def resize(self, name: str, size_bytes: int) -> None:
        self._limit(self.volume_path(name), size_bytes)

    def delete(self, name: str) -> None:
        """Remove the volume and any half-done restore of it (idempotent)."""
        path = self.volume_path(name)
        for candidate in (path, path.with_name(path.name + _NEW), path.with_name(path.name + _OLD)):
            self._delete_subvolume(candidate)

    def usage(self, name: str) -> VolumeUsage:
        return self._usage(self.volume_path(name))

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, volume: str, snapshot: str) -> None:
        """A read-only snapshot of the volume (idempotent; atomic in the kernel, nothing walked)."""
        target = self.snapshot_path(snapshot)
        if _is_subvolume(target):
            return
        _btrfs("subvolume", "snapshot", "-r", str(self.volume_path(volume)), str(target))

    def snapshot_exists(self, snapshot: str) -> bool:
        return _is_subvolume(self.snapshot_path(snapshot))

    def delete_snapshot(self, snapshot: str) -> None:
        self._delete_subvolume(self.snapshot_path(snapshot))

    def snapshot_usage(self, snapshot: str) -> VolumeUsage:
        return self._usage(self.snapshot_path(snapshot))

    def restore(self, volume: str, snapshot: str, size_bytes: int) -> None:
        """Make the volume what the snapshot holds. Crash-safe and idempotent, by the names present:

        (1) `V.new` = a writable snapshot of the snapshot, limited; (2) `V` -> `V.old`; (3) `V.new` -> `V`;
        (4) delete `V.old`. A rerun after a crash: `V` missing means (2) was done, so finish (3) and (4);
        `V` and `V.old` both present means (3) was done; `V` and `V.new` alone means (1) may be partial:
        start again. The workload is stopped meanwhile (the portal refuses a restore otherwise).
        """
        path = self.volume_path(volume)
        new, old = path.with_name(path.name + _NEW), path.with_name(path.name + _OLD)
        if not _is_subvolume(path):
            if not _is_subvolume(new):
                raise VolumePoolError(f"volume {volume} is missing")
            os.rename(new, path)
            self._delete_subvolume(old)
            return
        if _is_subvolume(old):
            self._delete_subvolume(old)
            return
        self._delete_subvolume(new)
        _btrfs("subvolume", "snapshot", str(self.snapshot_path(snapshot)), str(new))
        failpoint("pool.restore.new")
        self._limit(new, size_bytes)
        os.rename(path, old)
        failpoint("pool.restore.old")
        os.rename(new, path)
        failpoint("pool.restore.swapped")
        self._delete_subvolume(old)

    def clone(self, snapshot: str, volume: str, size_bytes: int) -> None:
        """A new volume holding what the snapshot holds (idempotent; `V.new` until complete)."""
        path = self.volume_path(volume)
        if _is_subvolume(path):
            self._limit(path, size_bytes)
            return
        new = path.with_name(path.name + _NEW)
        self._delete_subvolume(new)
        _btrfs("subvolume", "snapshot", str(self.snapshot_path(snapshot)), str(new))
        failpoint("pool.clone.new")
        self._limit(new, size_bytes)
        os.rename(new, path)

    # ------------------------------------------------------------------ pool
    def capacity(self) -> PoolCapacity:
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return PoolCapacity(total_bytes=total, free_bytes=free, used_bytes=max(total - free, 0))

    def volume_names(self) -> list[str]:
        directory = self.root / "volumes"
        return sorted(n for n in os.listdir(directory) if VOLUME_NAME.match(n)) if directory.is_dir() else []

    def snapshot_names(self) -> list[str]:
        directory = self.root / "snapshots"
        return (
            sorted(n for n in os.listdir(directory) if SNAPSHOT_NAME.match(n)) if directory.is_dir() else []
        )

    # ------------------------------------------------------------------ internals
    def _limit(self, path: Path, size_bytes: int) -> None:
        _btrfs("qgroup", "limit", str(int(size_bytes)), str(path))

    def _usage(self, path: Path) -> VolumeUsage:
        # `-f`: only the qgroup of this subvolume; --raw: bytes. Columns: id, rfer, excl, max_rfer, max_excl.
        out = _btrfs("qgroup", "show", "-r", "-e", "-f", "--raw", str(path)).stdout
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0].startswith("0/"):
                limit = None if fields[3] == "none" else int(fields[3])
                return VolumeUsage(used_bytes=int(fields[1]), limit_bytes=limit)
        raise VolumePoolError(f"no quota group for {path.name}")

    def _delete_subvolume(self, path: Path) -> None:
        if not _is_subvolume(path):
            return
        root_id = _btrfs("inspect-internal", "rootid", str(path)).stdout.strip()
        _btrfs("subvolume", "delete", "--commit-each", str(path))
        failpoint("pool.delete.deleted")
        # Its quota group would stay behind as "stale" (one per deleted volume or snapshot): once the
        # kernel's cleaner has dropped the subvolume, destroy it.
        if root_id.isdigit():
            _btrfs("subvolume", "sync", str(self.root), root_id, check=False)
            _btrfs("qgroup", "destroy", f"0/{root_id}", str(self.root), check=False)

    def stale_qgroups(self) -> list[str]:
        """Level-0 quota groups whose subvolume is gone (a delete killed between the subvolume's
        removal and its qgroup's): `qgroup show` names their path `<stale>`."""
        out = _btrfs("qgroup", "show", "--raw", str(self.root), check=False).stdout
        return [
            fields[0]
            for fields in (line.split() for line in out.splitlines())
            if len(fields) >= 4 and fields[0].startswith("0/") and fields[-1] == "<stale>"
        ]

    def clear_stale_qgroups(self) -> list[str]:
        """Destroy the stale quota groups (idempotent; what a rerun after a killed delete finishes)."""
        stale = self.stale_qgroups()
        if stale:
            _btrfs("subvolume", "sync", str(self.root), check=False)
            for qgroup in stale:
                _btrfs("qgroup", "destroy", qgroup, str(self.root), check=False)
        return self.stale_qgroups()

    def all_usage(self) -> dict[str, VolumeUsage]:
        """Every volume's usage in one call (the agent's periodic sampling)."""
        out = _btrfs("qgroup", "show", "-r", "-e", "--raw", str(self.root)).stdout
        usage: dict[str, VolumeUsage] = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[0].startswith("0/") and fields[5].startswith("volumes/"):
                name = fields[5].removeprefix("volumes/")
                if VOLUME_NAME.match(name):
                    limit = None if fields[3] == "none" else int(fields[3])
                    usage[name] = VolumeUsage(used_bytes=int(fields[1]), limit_bytes=limit)
        return usage
