"""A container's writable layer lives on a filesystem of its own size: the kernel refuses what exceeds it.

Played as the tenant would: a process in the container writes until the disk is full.
"""
# ruff: noqa: F811  (the driver's fixtures are imported from its test module and used as arguments)

from __future__ import annotations

import os
import threading
from pathlib import Path

from compute.runtimes import oci
from compute.runtimes.oci import MIB, OciRuntime
from tests.compute.test_oci_runtime import (  # noqa: F401  (fixtures)
    image_layers,
    new_id,
    pytestmark,
    remove_test_cgroup_parent,
    run_to_exit,
    runtime,
    spec_for,
    state_dir,
)

DISK_BYTES = 32 * MIB
FILL_SCRIPT = (
    "dd if=/dev/zero of=/root/fill bs=1M count=96 2>/dev/null; echo dd=$?; echo size=$(wc -c < /root/fill)"
)


def _fields(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def _loop_backing_files() -> list[str]:
    files = []
    for device in Path("/sys/block").glob("loop*"):
        backing = device / "loop" / "backing_file"
        if backing.exists():
            files.append(backing.read_text().strip())
    return files


def _allocated_bytes(directory: Path) -> int:
    """Bytes the host's filesystem gives to files under ``directory`` (not crossing into mounts)."""
    device = directory.stat().st_dev
    total = 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if (Path(root) / d).lstat().st_dev == device]
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.lstat().st_blocks * 512
    return total


def test_it_refuses_a_container_writing_past_its_disk_and_the_host_keeps_its_space(
    runtime: OciRuntime, image_layers: list[str], new_id
):
    spec = spec_for(new_id(), image_layers, "sh", "-c", FILL_SCRIPT, disk_bytes=DISK_BYTES)

    exit_code, output = run_to_exit(runtime, spec, timeout=30)

    fields = _fields(output)
    assert exit_code == 0, output
    assert fields["dd"] != "0"  # dd was stopped by ENOSPC
    assert int(fields["size"]) < DISK_BYTES
    # What the container's writes take on the host's filesystem: at most its disk.
    assert _allocated_bytes(runtime.bundle_dir(spec.container_id)) <= DISK_BYTES + MIB


def test_it_keeps_what_the_container_wrote_within_its_disk(runtime: OciRuntime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sh", "-c", "echo kept > /root/note", disk_bytes=DISK_BYTES)

    exit_code, _ = run_to_exit(runtime, spec)

    assert exit_code == 0
    assert (runtime.upper_dir(spec.container_id) / "root/note").read_text() == "kept\n"


def test_it_keeps_the_writable_layer_across_a_restart_and_drops_it_on_delete(
    runtime: OciRuntime, state_dir: Path, image_layers, new_id
):
    container_id = new_id()
    run_to_exit(runtime, spec_for(container_id, image_layers, "sh", "-c", "echo 1 > /root/n"))
    runtime.delete(container_id, keep_upper=True)

    exit_code, output = run_to_exit(runtime, spec_for(container_id, image_layers, "cat", "/root/n"))
    runtime.delete(container_id)

    assert (exit_code, output) == (0, "1\n")
    assert not (state_dir / "_kept" / container_id).exists()


def test_it_leaves_no_loop_device_or_mount_after_delete(runtime: OciRuntime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sleep", "30", disk_bytes=DISK_BYTES)
    runtime.run(spec)
    bundle = runtime.bundle_dir(spec.container_id)
    assert any(path.startswith(str(bundle)) for path in _loop_backing_files())

    runtime.delete(spec.container_id)

    assert not any(path.startswith(str(bundle)) for path in _loop_backing_files())
    with open("/proc/self/mountinfo") as mountinfo:
        assert not any(line.split(" ")[4].startswith(str(bundle)) for line in mountinfo)


def test_it_cleans_a_disk_a_killed_agent_left_mounted(runtime: OciRuntime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "true", disk_bytes=DISK_BYTES)
    runtime._prepare_bundle(spec)  # what an agent killed after the mounts leaves
    bundle = runtime.bundle_dir(spec.container_id)

    assert spec.container_id in runtime.list_ids()
    runtime.delete(spec.container_id)

    assert not bundle.exists()
    assert not any(path.startswith(str(bundle)) for path in _loop_backing_files())


def test_it_takes_a_disk_formatted_ahead_and_the_disk_still_holds_the_container_to_its_size(
    runtime: OciRuntime, image_layers, new_id
):
    assert runtime.prepare_spare_disk(DISK_BYTES) is True
    assert runtime.prepare_spare_disk(DISK_BYTES) is False  # one is ready: nothing more is made
    spare = runtime.spare_disk_path(DISK_BYTES)
    assert [p.name for p in spare.parent.iterdir()] == [spare.name]
    spec = spec_for(new_id(), image_layers, "sh", "-c", FILL_SCRIPT, disk_bytes=DISK_BYTES)

    exit_code, output = run_to_exit(runtime, spec, timeout=30)

    assert not spare.exists()  # taken by this create
    fields = _fields(output)
    assert exit_code == 0, output
    assert fields["dd"] != "0" and int(fields["size"]) < DISK_BYTES


def test_it_leaves_one_whole_spare_when_two_processes_make_it_at_once(runtime: OciRuntime, tmp_path: Path):
    spare = runtime.spare_disk_path(DISK_BYTES)
    spare.parent.mkdir(mode=0o700, exist_ok=True)
    made: list[bool] = []
    makers = [
        threading.Thread(target=lambda: made.append(oci._make_disk_image_unnamed(spare, DISK_BYTES)))
        for _ in range(2)
    ]
    for maker in makers:
        maker.start()
    for maker in makers:
        maker.join()

    assert sorted(made) == [False, True]
    assert [p.name for p in spare.parent.iterdir()] == [spare.name]  # nothing half-made beside it
    target = tmp_path / "mnt"
    target.mkdir()
    oci._mount_disk_image(spare, target)  # a whole ext4 filesystem
    try:
        assert (target / "lost+found").is_dir()
    finally:
        oci._unmount(target)


def test_it_mounts_a_disk_by_the_kernels_loop_calls_without_devices_and_clears_the_device_after(
    runtime: OciRuntime, tmp_path: Path
):
    image = tmp_path / "disk.img"
    oci._make_disk_image(image, DISK_BYTES)
    target = tmp_path / "mnt"
    target.mkdir()

    oci._loop_mount(image, target)
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            line = next(line for line in mountinfo if line.split(" ")[4] == str(target))
        options = set(line.split(" ")[5].split(","))
        assert {"nodev", "nosuid", "noatime"} <= options, line
        assert line.split(" - ")[1].startswith("ext4 /dev/loop"), line
        device = line.split(" - ")[1].split(" ")[1].removeprefix("/dev/")
        assert Path(f"/sys/block/{device}/loop/autoclear").read_text().strip() == "1"
        assert str(image) in _loop_backing_files()
    finally:
        oci._unmount(target)

    assert str(image) not in _loop_backing_files()  # cleared with its last user


def test_it_formats_a_disk_without_writing_its_journal_out_on_the_host(tmp_path: Path):
    """A fresh sparse image reads as zeros where unwritten: a 1 GiB disk takes well under a MiB of the
    host's space until the container writes (its zeroed journal took 33 MiB)."""
    image = tmp_path / "disk.img"
    oci._make_disk_image(image, 1024 * MIB)
    assert image.stat().st_blocks * 512 < 4 * MIB
    target = tmp_path / "mnt"
    target.mkdir()
    oci._mount_disk_image(image, target)
    try:
        (target / "note").write_text("kept\n")
        os.sync()
    finally:
        oci._unmount(target)
    oci._mount_disk_image(image, target)
    try:
        assert (target / "note").read_text() == "kept\n"
    finally:
        oci._unmount(target)
