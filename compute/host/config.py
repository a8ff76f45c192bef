"""The host machine's own configuration: where its state and layers live, its user-id pool, its guest.

Given once at process start (`configure`, from compute/apps.py's `ready()`, which reads the settings or
a joined host's agent.env); host code reads `local()` and never a Django setting. What the portal
decides about the host (its runtime, its network labels) is not here: that is `HostProfile`, served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalConfig:
    data_dir: Path
    store_dir: Path
    guest_dir: Path
    userns_pool: tuple[int, int]
    # The portal of a host on its own machine (empty on the portal's machine): blobs come from there.
    portal_url: str = ""
    credential: str = ""
    # An operator's volume pool directory (empty: the embedded pool under the host's state dir).
    volume_pool: str = ""
    volume_pool_gib: int = 64
    operation_heartbeat_seconds: float = 15.0

    @property
    def remote(self) -> bool:
        """This process is a host on its own machine (it talks to the portal over HTTP)."""
        return bool(self.portal_url and self.credential)

    def host_state_dir(self, host_id: object) -> Path:
        """Per-host state (containers, VMs, locks): separate hosts on one machine never share it."""
        path = self.data_dir / "hosts" / str(host_id)
        path.mkdir(parents=True, exist_ok=True)
        return path


_config: LocalConfig | None = None


def configure(config: LocalConfig) -> None:
    global _config
    _config = config


def local() -> LocalConfig:
    """The configuration given at start; without one (a bare script), the environment's defaults."""
    if _config is None:
        data_dir = Path(os.environ.get("BULKHEAD_DATA_DIR", "var")).resolve()
        pool = os.environ.get("BULKHEAD_USERNS_POOL", "1000000,1000000000").split(",")
        configure(
            LocalConfig(
                data_dir=data_dir,
                store_dir=Path(os.environ.get("BULKHEAD_STORE_DIR", str(data_dir / "store"))),
                guest_dir=Path(os.environ.get("BULKHEAD_GUEST_DIR", "var/guest")).resolve(),
                userns_pool=(int(pool[0]), int(pool[1])),
                portal_url=os.environ.get("BULKHEAD_PORTAL_URL", ""),
                credential=os.environ.get("BULKHEAD_HOST_CREDENTIAL", ""),
            )
        )
    assert _config is not None
    return _config
