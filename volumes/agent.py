"""The portal-side door to a host's volume pool: where it is (settings, the host's state directory) and
its operations' locks. The host's work on volumes, snapshots and backups is in
`compute.host.volumes` / `compute.host.backups` (no Django; reports through the host API).

A workload's volume mounts come with its spec (`compute.host.mounts`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings

from compute.host import volumes as host_volumes
from compute.host.volumes import PoolPlace
from compute.hosts import host_state_dir
from compute.models import Host
from compute.runtimes.volume_pool import VolumePool
from volumes.models import GIB

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
