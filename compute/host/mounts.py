"""Where a workload's volumes are on this host: the spec names them in the pool, the pool has the paths.

The pool is the host's (an operator's directory, or the embedded one under the host's state dir, made
when first needed); the spec's `pool_name` is the portal's server-generated name, never tenant text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compute.host.context import HostContext
from compute.host.spec import WorkloadSpec
from compute.runtimes.volume_pool import VolumePool, ensure_embedded_pool
from portal.errors import Explained

GIB = 1024**3
_ready_roots: set[Path] = set()


class VolumeUnavailable(Explained):
    """A workload's volume is not where it should be (told to the tenant)."""


@dataclass(frozen=True)
class VolumeSource:
    source: Path
    path: str
    read_only: bool
    tag: str


def host_pool(ctx: HostContext) -> VolumePool:
    """The host's pool, made and mounted on first use (embedded) or checked (an operator's directory)."""
    local = ctx.local
    if local.volume_pool:
        root = Path(local.volume_pool)
        pool = VolumePool(root)
        if root not in _ready_roots:
            pool.check()
    else:
        root = ctx.state_dir / "volume-pool"
        pool = VolumePool(root)
        if root not in _ready_roots or not root.is_mount():
            ensure_embedded_pool(ctx.state_dir / "volume-pool.img", root, local.volume_pool_gib * GIB)
    _ready_roots.add(root)
    return pool


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
