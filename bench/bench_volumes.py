"""Volumes (issue 17): snapshot time of a 10 GiB and a 10,000-file volume, and volume I/O from a
namespace container and a micro-VM beside the same `dd` on the volume's host directory.

Run as root: `.venv/bin/python bench/bench_volumes.py [--io-mib 512] [--snapshot-gib 10]`. Prints one
JSON line. The pool is a loop-mounted btrfs image made for the run (the product's embedded pool).
Each I/O figure is the median of --runs; the sides run interleaved so load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from compute.guest.build import ensure_guest  # noqa: E402
from compute.runtimes.libvirt import VmRuntime, VmSpec, VmVolume, WorkloadPayload  # noqa: E402
from compute.runtimes.libvirtd import domain_type_for_host, ensure_libvirtd  # noqa: E402
from compute.runtimes.oci import ContainerSpec, OciRuntime, VolumeMountSpec  # noqa: E402
from compute.runtimes.volume_pool import VolumePool, ensure_embedded_pool, unmount_embedded_pool  # noqa: E402
from tests.compute.guestroot import build_busybox_root, build_root_disk  # noqa: E402
from tests.compute.rootfs import build_busybox_rootfs  # noqa: E402

GIB = 1024**3


def dd_script(mib: int) -> str:
    """Write `mib` MiB durably (fsync), read it back (page cache hot on every side: a container cannot
    drop caches); print both durations in centiseconds, timed where the dd runs (/proc/uptime:
    busybox's date has no sub-second format)."""
    return (
        "t() { read u _ </proc/uptime; echo ${u%.*}${u#*.}; }; "
        f"s=$(t); dd if=/dev/zero of=/data/io bs=1M count={mib} conv=fsync 2>/dev/null; m=$(t); "
        "m2=$(t); "
        "dd if=/data/io of=/dev/null bs=1M 2>/dev/null; e=$(t); rm -f /data/io; "
        "echo IO $((m - s)) $((e - m2))"
    )


def parse_io(output: str, mib: int) -> tuple[float, float]:
    match = re.search(r"IO (\d+) (\d+)", output)
    if match is None:
        raise RuntimeError(f"no IO line in {output[-500:]!r}")
    write_cs, read_cs = max(int(match.group(1)), 1), max(int(match.group(2)), 1)
    return mib / (write_cs / 100), mib / (read_cs / 100)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def io_host(directory: Path, mib: int) -> tuple[float, float]:
    drop_caches()
    script = dd_script(mib).replace("/data/", f"{directory}/")
    return parse_io(
        subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout, mib
    )


def io_container(runtime: OciRuntime, rootfs: Path, directory: Path, mib: int) -> tuple[float, float]:
    drop_caches()
    container_id = "bhb-" + uuid.uuid4().hex[:16]
    spec = ContainerSpec(
        container_id=container_id,
        lower_dirs=[str(rootfs)],
        args=["/bin/sh", "-c", dd_script(mib)],
        memory_mib=512,
        volumes=[VolumeMountSpec(source=str(directory), path="/data")],
    )
    try:
        runtime.run(spec)
        runtime.wait_exit(container_id, 600)
        output = runtime.read_log(container_id).decode()
    finally:
        runtime.delete(container_id)
    return parse_io(output, mib)


def io_vm(
    runtime: VmRuntime, work: Path, guest: object, root_disk: Path, directory: Path, mib: int
) -> tuple[float, float]:
    drop_caches()
    vm_id = uuid.uuid4()
    volume = VmVolume(source=directory, tag="bhvol0", path="/data")
    spec = VmSpec(
        vm_id=vm_id,
        vcpus=1,
        memory_mib=512,
        kernel=guest.kernel,  # type: ignore[attr-defined]
        initrd=guest.initrd,  # type: ignore[attr-defined]
        root_disk=root_disk,
        rw_disk=work / f"{vm_id}.rw",
        console_log=work / f"{vm_id}.log",
        payload=WorkloadPayload(
            args=("/bin/sh", "-c", dd_script(mib)), env=("PATH=/bin",), volumes=(("bhvol0", "/data", False),)
        ),
        volumes=(volume,),
        rw_disk_size_mib=256,
        domain_type=domain_type_for_host(),  # type: ignore[arg-type]
    )
    runtime.create(spec)
    try:
        runtime.start(vm_id)
        deadline = time.monotonic() + 600
        while runtime.state(vm_id).status == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        output = runtime.workload_output(vm_id).decode()
    finally:
        runtime.delete(vm_id)
    return parse_io(output, mib)


def snapshot_seconds(pool: VolumePool, fill: str, size_gib: int) -> dict[str, float]:
    volume = "vol-" + uuid.uuid4().hex
    pool.create(volume, (size_gib + 1) * GIB)
    directory = pool.volume_path(volume)
    started = time.monotonic()
    if fill == "bytes":
        subprocess.run(
            [
                "dd",
                "if=/dev/urandom",
                f"of={directory}/data",
                "bs=4M",
                f"count={size_gib * 256}",
                "conv=fsync",
            ],
            check=True,
            capture_output=True,
        )
    else:
        for d in range(100):
            sub = directory / f"d{d:02}"
            sub.mkdir()
            for n in range(100):
                (sub / f"f{n:03}").write_bytes(os.urandom(4096))
        subprocess.run(["sync"], check=True)
    fill_seconds = time.monotonic() - started
    snapshot = "snap-" + uuid.uuid4().hex
    started = time.monotonic()
    pool.snapshot(volume, snapshot)
    seconds = time.monotonic() - started
    started = time.monotonic()
    shutil.copytree(
        directory, directory.parent / "copy", copy_function=shutil.copy2
    ) if fill == "files" else None
    copy_seconds = time.monotonic() - started if fill == "files" else None
    shutil.rmtree(directory.parent / "copy", ignore_errors=True)
    started = time.monotonic()
    restore_volume = volume
    pool.restore(restore_volume, snapshot, (size_gib + 1) * GIB)
    restore = time.monotonic() - started
    pool.delete_snapshot(snapshot)
    pool.delete(volume)
    result = {
        "fill_seconds": round(fill_seconds, 2),
        "snapshot_seconds": round(seconds, 4),
        "restore_seconds": round(restore, 4),
    }
    if copy_seconds is not None:
        result["plain_copy_seconds"] = round(copy_seconds, 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--io-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--snapshot-gib", type=int, default=10)
    parser.add_argument("--skip-vm", action="store_true")
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bht-bench-vol-", dir=REPO_ROOT / "var"))
    work.chmod(0o755)
    mount_point = work / "pool"
    results: dict[str, object] = {"benchmark": "volumes", "loadavg_start": os.getloadavg()[0]}
    ensure_embedded_pool(work / "pool.img", mount_point, (options.snapshot_gib + 8) * GIB)
    try:
        pool = VolumePool(mount_point)
        results["snapshot_10k_files"] = snapshot_seconds(pool, "files", 1)
        results[f"snapshot_{options.snapshot_gib}_gib"] = snapshot_seconds(
            pool, "bytes", options.snapshot_gib
        )

        volume = "vol-" + uuid.uuid4().hex
        pool.create(volume, 4 * GIB)
        directory = pool.volume_path(volume)
        rootfs = build_busybox_rootfs(work / "rootfs")
        containers = OciRuntime(state_dir=work / "containers", cgroup_parent="bht-bench-vol")
        sides = {
            "host": lambda: io_host(directory, options.io_mib),
            "container": lambda: io_container(containers, rootfs, directory, options.io_mib),
        }
        if not options.skip_vm:
            ensure_libvirtd()
            guest = ensure_guest()
            vms = VmRuntime(state_dir=work / "vms")
            root_disk = build_root_disk(build_busybox_root(work / "image"), work / "root.erofs", "erofs")
            sides["microvm"] = lambda: io_vm(vms, work, guest, root_disk, directory, options.io_mib)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for _ in range(options.runs):
            for name, run in sides.items():
                samples[name].append(run())
        medians = {
            name: {
                "write_mib_s": round(statistics.median(s[0] for s in values), 1),
                "read_mib_s": round(statistics.median(s[1] for s in values), 1),
            }
            for name, values in samples.items()
        }
        results["io_mib"] = options.io_mib
        results["io_median"] = medians
        results["io_ratio_vs_host"] = {
            name: {
                "write": round(medians[name]["write_mib_s"] / medians["host"]["write_mib_s"], 3),
                "read": round(medians[name]["read_mib_s"] / medians["host"]["read_mib_s"], 3),
            }
            for name in medians
            if name != "host"
        }
        results["accelerator"] = "tcg" if not options.skip_vm and domain_type_for_host() == "qemu" else "kvm"
        containers.remove_cgroup_parent()
    finally:
        results["loadavg_end"] = os.getloadavg()[0]
        print(json.dumps(results))
        unmount_embedded_pool(mount_point)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
