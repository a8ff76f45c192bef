"""The portal-side door to a host's volume pool on this machine (tests, `make run`'s shutdown): where it
is, as the host's own code finds it (`compute.host.mounts.host_place`, from the host's configuration).
The host's work on volumes, snapshots and backups is in `compute.host.volumes` / `compute.host.backups`
and its tasks in `compute.host.volume_tasks` (no Django; reports through the host API).

A workload's volume mounts come with its spec (`compute.host.mounts`).
"""

from __future__ import annotations

from pathlib import Path

from compute.host import volumes as host_volumes
from compute.host.context import host_context
from compute.host.mounts import host_place
from compute.host.volumes import PoolPlace
from compute.models import Host
from compute.runtimes.volume_pool import VolumePool


def place_for(host: Host | str) -> PoolPlace:
    """Where the host's pool is: `BULKHEAD_VOLUME_POOL` (an operator's btrfs) or the embedded image."""
    return host_place(host_context(host.pk if isinstance(host, Host) else host))


def embedded_pool_paths(host: Host | str) -> tuple[Path, Path]:
    """(image, mount point) of a host's embedded pool."""
    place = place_for(host)
    return place.image, place.mount_point


def pool_for(host: Host | str) -> VolumePool:
    return host_volumes.pool_for(place_for(host))


def pool_ready(host: Host | str) -> bool:
    return host_volumes.pool_ready(place_for(host))


def release_pool(host: Host | str) -> None:
    """Unmount the host's embedded pool (the agent's shutdown with --stop-workloads-on-exit; tests)."""
    host_volumes.release_pool(place_for(host))
