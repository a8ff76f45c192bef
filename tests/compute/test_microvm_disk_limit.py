"""Issue 13 (item 5 leftover): a micro-VM that writes past its `disk_gib` hits the end of its own disk.

The attacker's guest writes zeros into its root filesystem (the overlay whose upper dir is on the VM's
writable disk) until the write fails; while it runs, the host's data filesystem loses no more than the
disk's size. (A clean stop then exports the upper dir to the export disk: a second copy, see NOTES.md.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from compute.hosts import host_state_dir
from compute.models import Workload
from tests.compute.conftest import cleanup_host, create, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

GIB = 1024**3
# 1.5 GiB of zeros into a 1 GiB disk; `sync` so that nothing waits in the guest's page cache.
SCRIPT = "dd if=/dev/zero of=/fill bs=1M count=1536; echo DD-STATUS $?; sync; echo FILLED; sleep 600"


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def allocated_bytes(directory: Path, prefix: str) -> int:
    """What the files of one VM really take on the host (sparse files count their written blocks)."""
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.name.startswith(prefix))


def test_a_micro_vm_writing_past_its_disk_size_gets_a_failed_write_and_the_host_keeps_its_space(
    world: World, busybox: Any, store_dir: Path
) -> None:
    from tests.compute.runtimes import vm_runtime

    h = make_host("bht-vmdisk")
    try:
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            data_dir = Path(settings.DATA_DIR)
            before = free_bytes(data_dir)
            response = create(
                world,
                "mia",
                name="filler",
                image=str(busybox.pk),
                isolation="microvm",
                command=["/bin/sh", "-c", SCRIPT],
                memory_mib=128,
                disk_gib=1,
                restart_policy="never",
            )
            assert response.status_code == 202, response.json()
            workload = workload_in("filler", {"running"}, timeout=120)
            api = client_for(world, "mia")

            answers: list[int] = []

            def logs_once_filled() -> str | None:
                response = api.get(f"/api/v1/workloads/{workload.pk}/logs/")
                answers.append(response.status_code)
                if response.status_code != 200:  # the agent may be slow to answer while the disk fills
                    print("logs answered", response.status_code, response.json())
                    return None
                text = str(response.json()["logs"])
                return text if "FILLED" in text else None

            text = wait_until(logs_once_filled, timeout=600, interval=1, what="the guest's dd to end")
            status = re.search(r"DD-STATUS (\d+)", text)
            assert status is not None, text[-2000:]
            assert int(status.group(1)) != 0, text[-2000:]  # the write failed inside the guest
            vms = host_state_dir(h) / "vms"
            on_host = allocated_bytes(vms, str(workload.pk))
            lost = before - free_bytes(data_dir)
            assert (vms / f"{workload.pk}.rw.ext4").stat().st_blocks * 512 <= 1 * GIB
            assert on_host <= 1 * GIB + 16 * 1024**2, on_host  # the disk, its spec and empty export disks
            assert lost <= 1 * GIB + 256 * 1024**2, (lost, on_host)  # others may write meanwhile
    finally:
        for workload in Workload.objects.filter(host=h, isolation="microvm"):
            vm_runtime(h).delete(workload.pk)
        cleanup_host(h)
