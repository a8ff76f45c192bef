"""The portal-side door to a host's volume pool: where it is (settings, the host's state directory) and
the workload's volume mounts. The host's work on volumes, snapshots and backups is in
`compute.host.volumes` / `compute.host.backups` (no Django; reports through the host API).

`volume_paths` still reads the attachment rows (compute.agent and vm_agent call it while they take ORM
rows; it goes when the agent runs from specs that carry the volumes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from django.conf import settings

from compute.host import volumes as host_volumes
from compute.host.volumes import PoolPlace
from compute.hosts import host_state_dir
from compute.models import Host, Workload
from compute.runtimes.volume_pool import VolumePool
from portal.errors import Explained
from volumes.models import GIB, VolumeAttachment

log = logging.getLogger(__name__)


def embedded_pool_paths(host: Host | str) -> tuple[Path, Path]:
    """(image, mount point) of a host's embedded pool."""
    directory = host_state_dir(host)
    return directory / "volume-pool.img", directory / "volume-pool"


def place_for(host: Host | str) -> PoolPlace:
    """Where the host's pool is: `BULKHEAD_VOLUME_POOL` (an operator's btrfs) or the embedded image."""
    image, mount_point = embedded_pool_paths(host)
    directory = Path(settings.BULKHEAD_VOLUME_POOL) if settings.BULKHEAD_VOLUME_POOL else None
    return PoolPlace(directory, image, mount_point, settings.BULKHEAD_VOLUME_POOL_GIB * GIB)


def operation_locks_dir() -> Path:
    """Where host workers hold their operations' locks (operation ids are unique across hosts)."""
    return Path(settings.DATA_DIR) / "hosts" / "operation-locks"


def pool_for(host: Host | str) -> VolumePool:
    return host_volumes.pool_for(place_for(host))


def pool_ready(host: Host | str) -> bool:
    return host_volumes.pool_ready(place_for(host))


def release_pool(host: Host | str) -> None:
    """Unmount the host's embedded pool (the agent's shutdown with --stop-workloads-on-exit; tests)."""
    host_volumes.release_pool(place_for(host))


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
