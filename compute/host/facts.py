"""What this machine is and can do, as its agent reports it (and the portal's machine registers itself):
cpus, memory, disk, kernel, cgroups, the OCI runtimes (probed by really running one), libvirt, KVM, the
guest kernel. Django-free: the directories are the caller's."""

from __future__ import annotations

import os
import platform
import shutil
import socket
from pathlib import Path
from typing import Any


def _meminfo_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def gather_facts(data_dir: Path, guest_dir: Path, *, probe_runtimes: bool = True) -> dict[str, Any]:
    """What this machine is and can do; runtimes are probed by really running one."""
    from compute.runtimes import probe

    facts: dict[str, Any] = {
        "cpus": os.cpu_count() or 1,
        "memory_mib": _meminfo_mib(),
        "disk_free_bytes": shutil.disk_usage(data_dir).free,
        # Workload disks are sparse files here: placement keeps their sizes within the filesystem's.
        "disk_gib": shutil.disk_usage(data_dir).total // 1024**3,
        "kernel": platform.release(),
        "cgroup_mode": probe.cgroup_mode(),
        "hostname": socket.gethostname(),
    }
    if probe_runtimes:
        probes = probe.probe_oci_runtimes(data_dir / "probe")
        facts["oci_runtimes"] = [p.name for p in probes if p.works]
        facts["oci_runtime_probes"] = {p.name: p.reason or "works" for p in probes}
    facts["libvirt"] = shutil.which("libvirtd") is not None and shutil.which("qemu-system-x86_64") is not None
    facts["kvm"] = False
    if facts["libvirt"] and probe_runtimes:
        from compute.runtimes.libvirtd import kvm_works_cached

        # Booted for real with a short timeout: on some machines /dev/kvm exists but guests hang.
        facts["kvm"] = kvm_works_cached(timeout=5.0)
    try:
        from compute.guest.build import load_guest

        artifacts = load_guest(guest_dir)
    except Exception:  # a host without a built guest simply reports none
        artifacts = None
    if artifacts is not None:
        facts["guest_kernel"] = artifacts.kernel_version
    return facts
