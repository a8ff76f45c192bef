"""Where a workload's volumes are on this host: the spec names them in the pool, the pool has the paths.

The pool is the host's (an operator's directory, or the embedded one under the host's state dir, made
when first needed); the spec's `pool_name` is the portal's server-generated name, never tenant text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compute.host.context import HostContext
from compute.host.spec import WorkloadSpec
from compute.host.volumes import PoolPlace, pool_for
from compute.runtimes.volume_pool import VolumePool
from portal.errors import Explained

GIB = 1024**3


class VolumeUnavailable(Explained):
    """A workload's volume is not where it should be (told to the tenant)."""


@dataclass(frozen=True)
class VolumeSource:
    source: Path
    path: str
    read_only: bool
    tag: str


def host_place(ctx: HostContext) -> PoolPlace:
    """Where this host's pool is: the operator's directory, or the embedded image under its state dir."""
    local = ctx.local
    return PoolPlace(
        Path(local.volume_pool) if local.volume_pool else None,
        ctx.state_dir / "volume-pool.img",
        ctx.state_dir / "volume-pool",
        local.volume_pool_gib * GIB,
    )


def host_pool(ctx: HostContext) -> VolumePool:
    """The host's pool, made and mounted on first use (embedded) or checked (an operator's directory)."""
    return pool_for(host_place(ctx))


def volume_sources(ctx: HostContext, spec: WorkloadSpec) -> list[VolumeSource]:
    """The workload's volumes with their directories in this host's pool."""
    if not spec.volumes:
        return []
    pool = host_pool(ctx)
    sources = []
    for mount in spec.volumes:
        if not mount.on_host or not pool.exists(mount.pool_name):
            raise VolumeUnavailable(f"The volume {mount.name} is not on this workload's host.")
        sources.append(
            VolumeSource(pool.volume_path(mount.pool_name), mount.path, mount.read_only, mount.tag)
        )
    return sources
