"""Find out which OCI runtimes really run containers on this host, and how cgroups are mounted.

A runtime counts as working only when a trivial busybox container, started through the same
driver (conmon + the runtime + our config.json), exits 0. crun 1.8, for example, is installed on
hybrid-cgroup hosts but refuses to start there; the probe reports that as a reason, not a crash.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from compute.runtimes.oci import (
    CgroupMode,
    ContainerSpec,
    OciRuntime,
    OciRuntimeError,
    cgroup_mode,
)

KNOWN_OCI_RUNTIMES: tuple[str, ...] = ("runc", "crun")
PROBE_CONTAINER_PREFIX = "bh-probe-"
PROBE_TIMEOUT_S = 10.0
BUSYBOX_CANDIDATES: tuple[str, ...] = ("/bin/busybox", "/usr/bin/busybox")

__all__ = ["RuntimeProbe", "cgroup_mode", "probe_oci_runtimes", "working_oci_runtimes"]


@dataclass(frozen=True)
class RuntimeProbe:
    """The outcome of trying one OCI runtime on this host."""

    name: str
    works: bool
    reason: str  # "ok" or why it does not work
    path: str | None = None
    version: str | None = None
    cgroup_mode: CgroupMode | None = None


def working_oci_runtimes(
    state_dir: Path, candidates: tuple[str, ...] = KNOWN_OCI_RUNTIMES, *, cgroup_parent: str = "bulkhead"
) -> list[str]:
    """Return the names of the runtimes (of `candidates`) that really run a container here."""
    probes = probe_oci_runtimes(state_dir, candidates, cgroup_parent=cgroup_parent)
    return [probe.name for probe in probes if probe.works]


def probe_oci_runtimes(
    state_dir: Path, candidates: tuple[str, ...] = KNOWN_OCI_RUNTIMES, *, cgroup_parent: str = "bulkhead"
) -> list[RuntimeProbe]:
    """Run a trivial busybox container with each candidate runtime; report what worked and why not.

    `state_dir` holds a throw-away bundle per probe; everything created is removed again.
    """
    mode = cgroup_mode()
    state_dir.mkdir(parents=True, exist_ok=True)
    busybox = next((Path(path) for path in BUSYBOX_CANDIDATES if Path(path).exists()), None)
    with tempfile.TemporaryDirectory(prefix="probe-rootfs-", dir=state_dir) as rootfs_dir:
        rootfs = Path(rootfs_dir)
        if busybox is not None:
            _build_probe_rootfs(rootfs, busybox)
        return [
            _probe_one(name, state_dir, rootfs, busybox is not None, mode, cgroup_parent)
            for name in candidates
        ]


def _probe_one(
    name: str, state_dir: Path, rootfs: Path, have_busybox: bool, mode: CgroupMode, cgroup_parent: str
) -> RuntimeProbe:
    path = shutil.which(name)
    if path is None:
        return RuntimeProbe(name, False, f"{name} is not installed", cgroup_mode=mode)
    version = _runtime_version(path)
    if not have_busybox:
        return RuntimeProbe(
            name, False, "busybox-static is not installed: cannot build a probe rootfs", path, version, mode
        )
    try:
        runtime = OciRuntime(name, state_dir=state_dir / "runtimes", cgroup_parent=cgroup_parent)
    except OciRuntimeError as error:
        return RuntimeProbe(name, False, str(error), path, version, mode)
    container_id = f"{PROBE_CONTAINER_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
    spec = ContainerSpec(
        container_id=container_id,
        lower_dirs=[str(rootfs)],
        args=["/bin/true"],
        memory_mib=32,
        vcpus=0.5,
        pids_limit=16,
    )
    try:
        runtime.run(spec)
        exit_code = runtime.wait_exit(container_id, PROBE_TIMEOUT_S)
        reason = "ok" if exit_code == 0 else f"probe container exited with {exit_code}"
    except (OciRuntimeError, OSError, subprocess.SubprocessError) as error:
        reason = str(error)
    try:
        runtime.delete(container_id)
    except (OciRuntimeError, OSError) as error:
        # A runtime that cannot clean up after itself does not count as working.
        reason = f"{reason}; cleanup failed: {error}" if reason != "ok" else f"cleanup failed: {error}"
    return RuntimeProbe(name, reason == "ok", reason, path, version, mode)


def _runtime_version(path: str) -> str | None:
    try:
        completed = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    first_line = completed.stdout.strip().splitlines()[:1]
    return first_line[0] if first_line else None


def _build_probe_rootfs(rootfs: Path, busybox: Path) -> None:
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    for directory in ("etc", "proc", "sys", "dev", "tmp"):
        (rootfs / directory).mkdir(exist_ok=True)
    shutil.copy2(busybox.resolve(), rootfs / "bin" / "busybox")
    for applet in ("sh", "true"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    for name in ("hosts", "resolv.conf", "hostname"):
        (rootfs / "etc" / name).touch()
