"""The host side of volumes without the portal: the btrfs pool (real loop-mounted btrfs) and the
micro-VM wiring (domain XML, spec medium), each as the hostile side would poke at it."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute.runtimes.libvirt import (
    InvalidVmSpec,
    VmSpec,
    VmVolume,
    WorkloadPayload,
    domain_xml,
    spec_medium,
    virtiofs_socket_path,
)
from compute.runtimes.volume_pool import (
    VolumePool,
    VolumePoolError,
    ensure_embedded_pool,
    unmount_embedded_pool,
)

GIB = 1024**3


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[VolumePool]:
    mount_point = tmp_path / "pool"
    ensure_embedded_pool(tmp_path / "pool.img", mount_point, 8 * GIB)
    try:
        yield VolumePool(mount_point)
    finally:
        unmount_embedded_pool(mount_point)


def name(kind: str = "vol") -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def test_a_volume_is_a_limited_subvolume_and_a_write_past_the_limit_fails(pool: VolumePool) -> None:
    volume = name()
    pool.create(volume, GIB)
    pool.create(volume, GIB)  # idempotent
    fill = pool.volume_path(volume) / "fill"
    result = subprocess.run(
        ["dd", "if=/dev/zero", f"of={fill}", "bs=1M", "count=1200", "conv=fsync"], capture_output=True
    )
    assert result.returncode != 0
    assert fill.stat().st_size <= GIB
    subprocess.run(["sync"], check=True)
    assert pool.usage(volume).used_bytes <= GIB + 16 * 1024**2
    assert pool.all_usage()[volume].limit_bytes == GIB


def test_a_snapshot_is_instant_read_only_and_restores_the_volume(pool: VolumePool) -> None:
    volume, snapshot = name(), name("snap")
    pool.create(volume, GIB)
    (pool.volume_path(volume) / "table").write_text("before\n")
    started = time.monotonic()
    pool.snapshot(volume, snapshot)
    assert time.monotonic() - started < 1.0
    with pytest.raises(OSError):  # read-only, even for the host's root
        (pool.snapshot_path(snapshot) / "table").write_text("changed\n")
    (pool.volume_path(volume) / "table").write_text("after\n")
    pool.restore(volume, snapshot, GIB)
    assert (pool.volume_path(volume) / "table").read_text() == "before\n"
    assert pool.usage(volume).limit_bytes == GIB  # the restored volume keeps its limit


def test_a_restore_cut_short_at_any_step_converges(pool: VolumePool) -> None:
    volume, snapshot = name(), name("snap")
    pool.create(volume, GIB)
    (pool.volume_path(volume) / "f").write_text("old")
    pool.snapshot(volume, snapshot)
    (pool.volume_path(volume) / "f").write_text("new")
    path = pool.volume_path(volume)
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    # Killed after step 2 (V renamed away, V.new complete): the rerun finishes.
    subprocess.run(
        ["btrfs", "subvolume", "snapshot", str(pool.snapshot_path(snapshot)), str(new)],
        check=True,
        capture_output=True,
    )
    os.rename(path, old)
    pool.restore(volume, snapshot, GIB)
    assert (path / "f").read_text() == "old" and not new.exists() and not old.exists()
    # Killed during step 1 (a partial V.new beside V): the rerun starts again from the snapshot.
    (path / "f").write_text("newer")
    subprocess.run(["btrfs", "subvolume", "create", str(new)], check=True, capture_output=True)
    pool.restore(volume, snapshot, GIB)
    assert (path / "f").read_text() == "old" and not new.exists()
    assert pool.volume_names() == [volume]


def test_a_clone_is_a_new_volume_and_a_deleted_volume_leaves_nothing(pool: VolumePool) -> None:
    volume, snapshot, clone = name(), name("snap"), name()
    pool.create(volume, GIB)
    (pool.volume_path(volume) / "f").write_text("data")
    pool.snapshot(volume, snapshot)
    pool.clone(snapshot, clone, 2 * GIB)
    (pool.volume_path(clone) / "f").write_text("changed in the clone")
    assert (pool.volume_path(volume) / "f").read_text() == "data"
    assert pool.usage(clone).limit_bytes == 2 * GIB
    for v in (volume, clone):
        pool.delete(v)
    pool.delete_snapshot(snapshot)
    assert pool.volume_names() == [] and pool.snapshot_names() == []
    qgroups = subprocess.run(
        ["btrfs", "qgroup", "show", str(pool.root)], capture_output=True, text=True
    ).stdout
    assert "<stale>" not in qgroups


@pytest.mark.parametrize("bad", ["../etc", "vol-../../x", "vol-XYZ", "/tmp/x", "vol-" + "0" * 31])
def test_it_refuses_names_that_are_not_the_servers(pool: VolumePool, bad: str) -> None:
    with pytest.raises(VolumePoolError):
        pool.create(bad, GIB)


def vm_spec(volumes: tuple[VmVolume, ...], payload_volumes: tuple[tuple[str, str, bool], ...]) -> VmSpec:
    return VmSpec(
        vm_id=uuid.uuid4(),
        vcpus=1,
        memory_mib=128,
        kernel=Path("/k"),
        initrd=Path("/i"),
        root_disk=Path("/r"),
        rw_disk=Path("/v/w"),
        console_log=Path("/c"),
        payload=WorkloadPayload(args=("true",), volumes=payload_volumes),
        volumes=volumes,
    )


def test_a_micro_vm_gets_each_volume_through_virtiofs_with_shared_memory() -> None:
    volumes = (
        VmVolume(Path("/pool/volumes/vol-a"), "bhvol0", "/var/lib/db"),
        VmVolume(Path("/p/b"), "bhvol1", "/srv", True),
    )
    spec = vm_spec(volumes, tuple((v.tag, v.path, v.read_only) for v in volumes))
    domain = ET.fromstring(domain_xml(spec, qemu_uid=1, qemu_gid=1))  # noqa: S314 (ours)
    assert domain.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    assert domain.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
    filesystems = domain.findall("devices/filesystem")
    assert [fs.find("target").get("dir") for fs in filesystems] == ["bhvol0", "bhvol1"]  # type: ignore[union-attr]
    assert filesystems[0].find("source").get("socket") == str(virtiofs_socket_path(spec.vm_id, "bhvol0"))  # type: ignore[union-attr]
    assert len(str(virtiofs_socket_path(spec.vm_id, "bhvol0"))) < 108  # a unix socket's limit
    assert filesystems[0].find("driver").get("type") == "virtiofs"  # type: ignore[union-attr]
    # The host's path never reaches the guest; the init gets tag, path and mode only.
    with tarfile.open(fileobj=io.BytesIO(spec_medium(spec.payload, "0" * 32))) as archive:
        member = archive.extractfile("volumes")
        assert member is not None
        assert member.read() == b"bhvol0\0/var/lib/db\0rw\0bhvol1\0/srv\0ro\0"


@pytest.mark.parametrize(
    ("tag", "path"),
    [
        ("bhvol0", "relative"),
        ("bhvol0", "/a/../../etc"),
        ("vol0", "/data"),
        ("bhvol0", "/a\nb"),
        ("bhvol0", "/"),
    ],
)
def test_a_micro_vm_spec_with_a_bad_volume_is_refused(tag: str, path: str) -> None:
    volumes = (VmVolume(Path("/pool/volumes/vol-a"), tag, path),)
    with pytest.raises(InvalidVmSpec):
        domain_xml(vm_spec(volumes, ((tag, path, False),)), qemu_uid=1, qemu_gid=1)
