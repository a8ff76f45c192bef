"""Micro-VM benchmark: boot latency through VmRuntime vs raw QEMU, stop latency, memory per VM.

Prints one JSON line. Baseline: `qemu-system-x86_64` started directly with the same accelerator
(TCG here), machine, kernel, initramfs and disks, timed to the same console line (BULKHEAD-INIT,
the first line of the guest's init). Goal: VmRuntime create+start -> that line <= 1.3x raw QEMU.

    .venv/bin/python bench/bench_microvm.py [--runs 5] [--vms 20] [--vm-memory 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from compute.guest.build import ensure_guest  # noqa: E402
from compute.guest.initramfs import build_initramfs  # noqa: E402
from compute.guest.kernel import ensure_kernel  # noqa: E402
from compute.runtimes.libvirt import (  # noqa: E402
    VmRuntime,
    VmSpec,
    WorkloadPayload,
    export_disk_path,
    kernel_cmdline,
    make_export_disk,
    make_rw_disk,
    spec_disk_path,
    write_spec_disk,
)
from compute.runtimes.libvirtd import domain_type_for_host, ensure_libvirtd  # noqa: E402
from tests.compute.guestroot import build_busybox_root, build_root_disk  # noqa: E402

INIT_LINE = b"BULKHEAD-INIT"
SLEEPER = WorkloadPayload(args=("sleep", "600"), env=("PATH=/bin",))


def main() -> int:
    """Run every measurement and print the figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--vm-memory", type=int, default=128)
    parser.add_argument("--skip-density", action="store_true")
    parser.add_argument(
        "--spec-medium-only",
        action="store_true",
        help="only the spec medium figures: host step and raw boots, old layout vs new",
    )
    options = parser.parse_args()

    ensure_libvirtd()
    guest = ensure_guest()
    domain_type = domain_type_for_host()
    accel = "kvm" if domain_type == "kvm" else "tcg"
    work = Path(tempfile.mkdtemp(prefix="bht-bench-vm-"))
    work.chmod(0o755)
    runtime = VmRuntime(state_dir=work / "state")
    results: dict[str, object] = {
        "benchmark": "microvm",
        "accelerator": accel,
        "kernel": guest.kernel_version,
        "initrd": guest.initrd.name,
        "loadavg_start": os.getloadavg()[0],
    }
    try:
        root_disk = build_root_disk(build_busybox_root(work / "image"), work / "root.erofs", "erofs")
        # The other compression than the guest's default, to keep that choice measured.
        modules = ensure_kernel(guest.kernel.parents[1]).modules
        other_compression = "none" if guest.initrd.suffix == ".gz" else "gzip"
        other_initrd = build_initramfs(
            work / f"initramfs-{other_compression}", modules, compression=other_compression
        )

        if options.spec_medium_only:
            results["spec_medium"] = measure_spec_medium(work, guest, root_disk, accel, options.runs)
            return 0

        def spec(machine: str = "q35", memory: int = 256, initrd: Path = guest.initrd) -> VmSpec:
            vm_id = uuid.uuid4()
            return VmSpec(
                vm_id=vm_id,
                vcpus=1,
                memory_mib=memory,
                kernel=guest.kernel,
                initrd=initrd,
                root_disk=root_disk,
                rw_disk=work / f"{vm_id}.rw",
                console_log=work / f"{vm_id}.log",
                payload=SLEEPER,
                rw_disk_size_mib=256,
                domain_type=domain_type,  # type: ignore[arg-type]
                machine=machine,
            )  # type: ignore[arg-type]

        # Interleave the variants so that load from other processes hits all of them alike.
        samples: dict[str, list[float]] = {}
        variants = {
            "vmruntime_q35": lambda: boot_vmruntime(runtime, spec("q35")),
            "raw_qemu_q35": lambda: boot_raw(work, spec("q35"), accel),
            "vmruntime_pc": lambda: boot_vmruntime(runtime, spec("pc")),
            "raw_qemu_pc": lambda: boot_raw(work, spec("pc"), accel),
            f"raw_qemu_q35_{other_compression}_initrd": lambda: boot_raw(
                work, spec("q35", initrd=other_initrd), accel
            ),
        }
        for _ in range(options.runs):
            for name, boot in variants.items():
                samples.setdefault(name, []).append(boot())
        medians = {name: round(statistics.median(values), 3) for name, values in samples.items()}
        results["boot_to_init_seconds_median"] = medians
        results["boot_to_init_seconds_samples"] = {k: [round(v, 3) for v in vs] for k, vs in samples.items()}
        results["vmruntime_phases_seconds_median"] = {
            phase: round(statistics.median(values), 3) for phase, values in PHASES.items()
        }
        results["vmruntime_vs_raw_q35_ratio"] = round(medians["vmruntime_q35"] / medians["raw_qemu_q35"], 3)
        results["raw_microvm"] = probe_raw_microvm(work, spec("q35"), accel)
        results["stop_seconds"] = measure_stop(runtime, [spec("q35") for _ in range(3)])
        if not options.skip_density:
            results["density"] = measure_density(
                runtime, [spec("q35", memory=options.vm_memory) for _ in range(options.vms)]
            )
    finally:
        for vm_id in runtime.list_ids():
            with contextlib.suppress(Exception):
                runtime.delete(vm_id)
        runtime.close()
        shutil.rmtree(work, ignore_errors=True)
        results["loadavg_end"] = os.getloadavg()[0]
        print(json.dumps(results))
    return 0


START_LINE = b"BULKHEAD-START"


def measure_spec_medium(work: Path, guest: Any, root_disk: Path, accel: str, runs: int) -> dict[str, object]:
    """Issue 13: the spec on a read-only disk built per boot vs the old spec files on the writable disk.

    Host step (what a restart of a stopped VM costs before QEMU starts): old = e2fsck journal replay +
    loop mount + write the files + umount of the writable disk; new = the spec tar disk + an empty
    sparse export disk. Boot: raw QEMU to the init's first line and to BULKHEAD-START (the spec read)
    with the initramfs of `main` before the change (2 disks, spec on the writable disk) vs today's
    (4 disks), interleaved run by run.
    """
    old_init = work / "init-old.sh"
    old_init.write_bytes(
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "show", f"{OLD_INIT_COMMIT}:compute/guest/init.sh"],
            capture_output=True,
            check=True,
        ).stdout
    )
    modules = ensure_kernel(guest.kernel.parents[1]).modules
    old_initrd = build_initramfs(
        work / "initramfs-old.cpio.gz", modules, compression="gzip", init_script=old_init
    )
    samples: dict[str, list[float]] = {}
    base = VmSpec(
        vm_id=uuid.uuid4(),
        vcpus=1,
        memory_mib=256,
        kernel=guest.kernel,
        initrd=guest.initrd,
        root_disk=root_disk,
        rw_disk=work / "medium.rw",
        console_log=work / "medium.log",
        payload=SLEEPER,
        rw_disk_size_mib=256,
    )
    old_disk = work / "old-layout.rw"
    _old_make_rw_disk(old_disk, base.rw_disk_size_mib)
    make_rw_disk(base.rw_disk, base.rw_disk_size_mib)
    for _ in range(runs * 4):
        started = time.perf_counter()
        _old_rewrite_payload(old_disk, work / "old-mount")
        samples.setdefault("host_step_old_mount_write_umount", []).append(time.perf_counter() - started)
        started = time.perf_counter()
        write_spec_disk(spec_disk_path(base.rw_disk), base.payload, "0" * 32)
        make_export_disk(export_disk_path(base.rw_disk), base.rw_disk_size_mib)
        samples.setdefault("host_step_new_spec_and_export_disks", []).append(time.perf_counter() - started)
    for _ in range(runs):
        init, start = boot_raw_lines(_raw_args(base, accel, old_initrd, [old_disk]))
        samples.setdefault("raw_boot_old_layout_to_init", []).append(init)
        samples.setdefault("raw_boot_old_layout_to_start", []).append(start)
        new_disks = [base.rw_disk, spec_disk_path(base.rw_disk), export_disk_path(base.rw_disk)]
        init, start = boot_raw_lines(_raw_args(base, accel, guest.initrd, new_disks, readonly=(1,)))
        samples.setdefault("raw_boot_new_layout_to_init", []).append(init)
        samples.setdefault("raw_boot_new_layout_to_start", []).append(start)
    medians = {name: round(statistics.median(values), 4) for name, values in samples.items()}
    return {
        "old_init_from": OLD_INIT_COMMIT,
        "medians_seconds": medians,
        "samples_seconds": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "boot_to_start_new_vs_old_ratio": round(
            medians["raw_boot_new_layout_to_start"] / medians["raw_boot_old_layout_to_start"], 3
        ),
    }


# The last commit whose guest read its spec from the writable disk (the baseline of measure_spec_medium).
OLD_INIT_COMMIT = "4402a37"


def _old_make_rw_disk(path: Path, size_mib: int) -> None:
    with tempfile.TemporaryDirectory() as staging:
        for name in ("upper", "work", "bulkhead"):
            Path(staging, name).mkdir()
        _old_write_payload(Path(staging, "bulkhead"))
        with path.open("wb") as disk:
            disk.truncate(size_mib * 1024 * 1024)
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-d",
                staging,
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                path,
            ],
            check=True,
        )


def _old_write_payload(directory: Path) -> None:
    files = {
        "args": b"sleep\0600\0",
        "env": b"PATH=/bin\0",
        "cwd": b"/\0",
        "user": b"0:0\n",
        "nonce": b"0" * 32 + b"\n",
        "tty": b"0\n",
    }
    for name, content in files.items():
        (directory / name).write_bytes(content)
        (directory / name).chmod(0o600)


def _old_rewrite_payload(disk: Path, mount_point: Path) -> None:
    """What the host did before issue 13 at every create of a stopped VM (on a disk only we wrote)."""
    mount_point.mkdir(exist_ok=True)
    subprocess.run(["e2fsck", "-p", "-E", "journal_only", str(disk)], capture_output=True, check=False)
    subprocess.run(
        ["mount", "-t", "ext4", "-o", "loop,nodev,nosuid,noexec", str(disk), str(mount_point)], check=True
    )
    try:
        _old_write_payload(mount_point / "bulkhead")
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _raw_args(
    spec: VmSpec, accel: str, initrd: Path, disks: list[Path], readonly: tuple[int, ...] = ()
) -> list[str]:
    """Raw QEMU with `disks` (the first is the rw disk); the 2nd and 3rd carry the spec/export serials."""
    args = raw_qemu_args(replace(spec, initrd=initrd), accel, disks[0])
    serials = {1: "bulkhead-spec", 2: "bulkhead-export"}
    for index, disk in enumerate(disks[1:], start=1):
        flag = ",readonly=on" if index in readonly else ""
        args += ["-drive", f"id=extra{index},file={disk},format=raw,if=none{flag}"]
        args += ["-device", f"virtio-blk-pci,drive=extra{index},serial={serials[index]}"]
    return args


def boot_raw_lines(args: list[str], timeout: float = 120.0) -> tuple[float, float]:
    """Seconds from spawning QEMU to the init's first line and to BULKHEAD-START (spec read, workload up)."""
    started = time.monotonic()
    seen_at: dict[bytes, float] = {}
    with _qemu(args) as process:
        assert process.stdout is not None
        seen = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while START_LINE not in seen_at:
                remaining = started + timeout - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError(f"raw QEMU boot stopped before {START_LINE!r}: {seen[-300:]!r}")
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    raise TimeoutError(f"raw QEMU exited before {START_LINE!r}: {seen[-300:]!r}")
                seen = seen[-4096:] + chunk
                for line in (INIT_LINE, START_LINE):
                    if line in seen and line not in seen_at:
                        seen_at[line] = time.monotonic() - started
    return seen_at[INIT_LINE], seen_at[START_LINE]


PHASES: dict[str, list[float]] = {"create": [], "start": []}


def boot_vmruntime(runtime: VmRuntime, spec: VmSpec, timeout: float = 120.0) -> float:
    """Seconds from create() to the init's first line in the console log; the VM is deleted after."""
    started = time.monotonic()
    runtime.create(spec)
    created = time.monotonic()
    runtime.start(spec.vm_id)
    PHASES["create"].append(created - started)
    PHASES["start"].append(time.monotonic() - created)
    try:
        deadline = started + timeout
        while INIT_LINE not in runtime.console_log(spec.vm_id):
            if time.monotonic() > deadline:
                raise TimeoutError("VmRuntime boot did not reach the init")
            time.sleep(0.005)
        return time.monotonic() - started
    finally:
        runtime.delete(spec.vm_id)


def raw_qemu_args(spec: VmSpec, accel: str, rw_disk: Path) -> list[str]:
    """Root and writable disks as the domain has them (the spec/export disks are added by callers)."""
    # The QEMU command line equivalent of the domain libvirt starts for `spec` (minus libvirt's extras).
    return [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-machine",
        spec.machine,
        "-m",
        str(spec.memory_mib),
        "-smp",
        str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        kernel_cmdline(spec),
        # Explicit devices in command-line order (if=virtio drives would come after any -device).
        "-drive",
        f"id=root,file={spec.root_disk},format=raw,if=none,readonly=on",
        "-device",
        "virtio-blk-pci,drive=root",
        "-drive",
        f"id=rw,file={rw_disk},format=raw,if=none",
        "-device",
        "virtio-blk-pci,drive=rw",
    ]


def boot_raw(work: Path, spec: VmSpec, accel: str, timeout: float = 120.0) -> float:
    """Seconds from spawning QEMU directly to the init's first line on its serial stdout."""
    rw_disk = work / f"raw-{spec.vm_id}.rw"
    make_rw_disk(rw_disk, spec.rw_disk_size_mib)
    write_spec_disk(spec_disk_path(rw_disk), spec.payload, "0" * 32)
    make_export_disk(export_disk_path(rw_disk), spec.rw_disk_size_mib)
    disks = [rw_disk, spec_disk_path(rw_disk), export_disk_path(rw_disk)]
    try:
        started = time.monotonic()
        with _qemu(_raw_args(spec, accel, spec.initrd, disks, readonly=(1,))) as process:
            if not _wait_for_line(process, INIT_LINE, started + timeout):
                raise TimeoutError("raw QEMU boot did not reach the init")
            return time.monotonic() - started
    finally:
        for disk in disks:
            disk.unlink(missing_ok=True)


def probe_raw_microvm(work: Path, spec: VmSpec, accel: str, timeout: float = 60.0) -> dict[str, object]:
    """Does `-M microvm` boot to the init here (libvirt cannot define it, so raw QEMU only)?"""
    rw_disk = work / f"raw-{spec.vm_id}.rw"
    make_rw_disk(rw_disk, spec.rw_disk_size_mib)
    args = [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-machine",
        "microvm,pit=on,pic=on,rtc=on",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        kernel_cmdline(spec),
        "-drive",
        f"id=root,file={spec.root_disk},format=raw,if=none,readonly=on",
        "-device",
        "virtio-blk-device,drive=root",
        "-drive",
        f"id=rw,file={rw_disk},format=raw,if=none",
        "-device",
        "virtio-blk-device,drive=rw",
    ]
    try:
        started = time.monotonic()
        with _qemu(args) as process:
            reached = _wait_for_line(process, INIT_LINE, started + timeout)
            elapsed = time.monotonic() - started
        return {
            "reached_init": reached,
            "seconds": round(elapsed, 3) if reached else None,
            "timeout_seconds": timeout,
        }
    finally:
        rw_disk.unlink(missing_ok=True)


def measure_stop(runtime: VmRuntime, specs: list[VmSpec], timeout: float = 180.0) -> dict[str, object]:
    """Boot sleepers in parallel, then time stop() of each (ACPI power button -> guest powers off)."""
    for spec in specs:
        runtime.create(spec)
        runtime.start(spec.vm_id)
    durations = []
    exit_codes = []
    try:
        for spec in specs:
            _wait_console(runtime, spec.vm_id, b"BULKHEAD-START", timeout)
            started = time.monotonic()
            state = runtime.stop(spec.vm_id, grace_seconds=30)
            durations.append(time.monotonic() - started)
            exit_codes.append(state.exit_code)
    finally:
        for spec in specs:
            runtime.delete(spec.vm_id)
    return {
        "median": round(statistics.median(durations), 3),
        "samples": [round(d, 3) for d in durations],
        "exit_codes": exit_codes,
    }


def measure_density(runtime: VmRuntime, specs: list[VmSpec], timeout: float = 600.0) -> dict[str, object]:
    """Run all `specs` at once; per QEMU process: PSS and the resident guest RAM, the rest is overhead."""
    started = time.monotonic()
    for spec in specs:
        runtime.create(spec)
        runtime.start(spec.vm_id)
    try:
        for spec in specs:
            _wait_console(runtime, spec.vm_id, b"BULKHEAD-START", timeout)
        all_running = time.monotonic() - started
        per_vm = []
        for spec in specs:
            pid = runtime.qemu_pid(spec.vm_id)
            assert pid is not None
            per_vm.append(_memory_of(pid, spec.memory_mib))
        overhead = [vm["pss_mib"] - vm["guest_ram_resident_mib"] for vm in per_vm]
        return {
            "vms": len(specs),
            "guest_memory_mib": specs[0].memory_mib,
            "seconds_until_all_workloads_started": round(all_running, 2),
            "overhead_mib_per_vm_median": round(statistics.median(overhead), 1),
            "overhead_mib_per_vm_max": round(max(overhead), 1),
            "pss_mib_per_vm_median": round(statistics.median(vm["pss_mib"] for vm in per_vm), 1),
            "guest_ram_resident_mib_median": round(
                statistics.median(vm["guest_ram_resident_mib"] for vm in per_vm), 1
            ),
            "pss_mib_total": round(sum(vm["pss_mib"] for vm in per_vm), 1),
        }
    finally:
        for spec in specs:
            runtime.delete(spec.vm_id)


def _memory_of(pid: int, guest_mib: int) -> dict[str, float]:
    """PSS of the process, and RSS of its guest RAM mapping (the one anonymous mapping of guest size)."""
    pss_kib = 0
    guest_rss_kib = 0
    size_kib = 0
    in_guest_ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(":"):
            in_guest_ram = False
            continue
        if fields[0] == "Size:":
            size_kib = int(fields[1])
            # QEMU maps guest RAM as one anonymous region of exactly the guest's size.
            in_guest_ram = size_kib == guest_mib * 1024
        elif fields[0] == "Pss:":
            pss_kib += int(fields[1])
        elif fields[0] == "Rss:" and in_guest_ram:
            guest_rss_kib += int(fields[1])
    return {"pss_mib": pss_kib / 1024, "guest_ram_resident_mib": guest_rss_kib / 1024}


def _wait_console(runtime: VmRuntime, vm_id: uuid.UUID, text: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in runtime.console_log(vm_id):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} did not appear on {vm_id}'s console")
        time.sleep(0.05)


@contextlib.contextmanager
def _qemu(args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _wait_for_line(process: subprocess.Popen[bytes], line: bytes, deadline: float) -> bool:
    assert process.stdout is not None
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while line not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return False
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                return False
            seen = seen[-4096:] + chunk
    return True


if __name__ == "__main__":
    sys.exit(main())
