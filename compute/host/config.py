"""The host machine's own configuration: where its state and layers live, its user-id pool, its guest.

Given once at process start: on the portal's machine by compute/apps.py's `ready()` (from the settings);
on a joined host by `from_environment()` (its agent.env, which `python -m compute.host run` puts into the
environment of its worker and agent). Host code reads `local()` and never a Django setting. What the
portal decides about the host (its runtime, its network labels) is not here: that is `HostProfile`, served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from compute.host.broker import url_with_credential

# The checkout (or installed tree) this code runs from: the defaults of the data and guest directories.
ROOT = Path(__file__).resolve().parents[2]


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
    # Where the host keeps backup chunks before they reach the portal (on the portal's machine: its store).
    backup_dir: Path | None = None
    # The broker with the host's own user and credential (the portal's REDIS_URL on the portal's machine).
    broker_url: str = ""
    sample_seconds: float = 10.0
    # Create a container from the spec its create's message carries while the claim is answered
    # (`compute.host.tasks.CreateWorkloadTask`); off: created after the claim, from the claim's spec.
    create_ahead: bool = True

    @property
    def remote(self) -> bool:
        """This process is a host on its own machine (it talks to the portal over HTTP)."""
        return bool(self.portal_url and self.credential)

    def host_state_dir(self, host_id: object) -> Path:
        """Per-host state (containers, VMs, locks): separate hosts on one machine never share it."""
        path = self.data_dir / "hosts" / str(host_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def operation_locks_dir(self) -> Path:
        """Where host workers hold their operations' locks (operation ids are unique across hosts)."""
        return self.data_dir / "hosts" / "operation-locks"

    @property
    def backup_store_dir(self) -> Path:
        return self.backup_dir or self.data_dir / "backups"


_config: LocalConfig | None = None


def configure(config: LocalConfig) -> None:
    global _config
    _config = config


def from_environment(environ: dict[str, str] | None = None) -> LocalConfig:
    """The configuration a host process takes from its environment (the same names as the portal's
    settings, which a joined host's agent.env and the operator's environment give)."""
    env = os.environ if environ is None else environ
    data_dir = Path(env.get("BULKHEAD_DATA_DIR") or ROOT / "var").resolve()
    pool = (env.get("BULKHEAD_USERNS_POOL") or "1000000,1000000000").split(",")
    credential = env.get("BULKHEAD_HOST_CREDENTIAL", "")
    return LocalConfig(
        data_dir=data_dir,
        store_dir=Path(env.get("BULKHEAD_STORE_DIR") or data_dir / "store"),
        guest_dir=Path(env.get("BULKHEAD_GUEST_DIR") or ROOT / "var" / "guest").resolve(),
        userns_pool=(int(pool[0]), int(pool[1])),
        portal_url=env.get("BULKHEAD_PORTAL_URL", ""),
        credential=credential,
        volume_pool=env.get("BULKHEAD_VOLUME_POOL", ""),
        volume_pool_gib=int(env.get("BULKHEAD_VOLUME_POOL_GIB") or 64),
        operation_heartbeat_seconds=float(env.get("BULKHEAD_OPERATION_HEARTBEAT_SECONDS") or 15),
        backup_dir=Path(env["BULKHEAD_BACKUP_DIR"]) if env.get("BULKHEAD_BACKUP_DIR") else None,
        broker_url=url_with_credential(env.get("REDIS_URL", ""), credential),
        sample_seconds=float(env.get("BULKHEAD_SAMPLE_SECONDS") or 10),
        create_ahead=env.get("BULKHEAD_CREATE_AHEAD", "1") != "0",
    )


def local() -> LocalConfig:
    """The configuration given at start; without one (a host process, a bare script), the environment's."""
    if _config is None:
        configure(from_environment())
    assert _config is not None
    return _config
