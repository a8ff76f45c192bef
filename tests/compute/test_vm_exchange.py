"""The two one-way media between a micro-VM's host and its guest, without booting anything.

The spec disk is built by the host from server values only; the export disk is the guest's word, so its
header is checked and its stream goes through the layer store's hardened unpack like a pulled layer.
The real guest on both ends is exercised in test_microvm.py and test_microvm_boundary.py.
"""

from __future__ import annotations

import io
import tarfile
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from compute.runtimes.libvirt import (
    ChangesNotExported,
    VmSpec,
    WorkloadPayload,
    domain_xml,
    export_disk_path,
    make_export_disk,
    read_export_header,
    spec_disk_path,
    spec_medium,
    unpack_exported_changes,
    write_spec_disk,
)
from imaging.store import LayerStore, UnsafeEntry

NONCE = "0123456789abcdef0123456789abcdef"


def test_it_builds_the_spec_disk_as_a_tar_of_plain_files_with_the_server_values() -> None:
    payload = WorkloadPayload(args=("sh", "-c", "echo $HOME; ls"), env=("A=b c",), cwd="/srv", uid=7, gid=8)
    data = spec_medium(payload, NONCE)
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
        assert all(member.isfile() for member in members)
        content = {member.name: archive.extractfile(member).read() for member in members}  # type: ignore[union-attr]
    assert content == {
        "args": b"sh\0-c\0echo $HOME; ls\0",
        "env": b"A=b c\0",
        "cwd": b"/srv\0",
        "user": b"7:8\n",
        "nonce": NONCE.encode() + b"\n",
        "tty": b"0\n",
    }


def test_it_replaces_a_link_planted_where_the_spec_disk_goes_instead_of_following_it(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_bytes(b"host file\n")
    rw_disk = tmp_path / "vm.rw"
    spec_disk_path(rw_disk).symlink_to(canary)
    export_disk_path(rw_disk).symlink_to(canary)
    write_spec_disk(spec_disk_path(rw_disk), WorkloadPayload(args=("true",)), NONCE)
    make_export_disk(export_disk_path(rw_disk), 16)
    assert canary.read_bytes() == b"host file\n"
    assert not spec_disk_path(rw_disk).is_symlink() and not export_disk_path(rw_disk).is_symlink()


def test_it_gives_the_guest_a_read_only_spec_disk_and_an_export_disk() -> None:
    spec = VmSpec(
        vm_id=uuid.uuid4(),
        vcpus=1,
        memory_mib=128,
        kernel=Path("/k"),
        initrd=Path("/i"),
        root_disk=Path("/r"),
        rw_disk=Path("/v/w"),
        console_log=Path("/c"),
        payload=WorkloadPayload(args=("true",)),
    )
    disks = {
        disk.find("target").get("dev"): disk  # type: ignore[union-attr]
        for disk in ET.fromstring(domain_xml(spec, qemu_uid=1, qemu_gid=1)).iter("disk")  # noqa: S314 (ours)
    }
    assert disks["vdc"].find("source").get("file") == "/v/w.spec"  # type: ignore[union-attr]
    assert disks["vdc"].find("readonly") is not None
    assert disks["vdc"].findtext("serial") == "bulkhead-spec"
    assert disks["vdd"].find("source").get("file") == "/v/w.export"  # type: ignore[union-attr]
    assert disks["vdd"].findtext("serial") == "bulkhead-export"


def export_disk(tmp_path: Path, stream: bytes, header: bytes | None, size: int = 64 * 1024) -> Path:
    """An export disk as a guest could leave it: `stream` at the start, `header` in the last sector."""
    disk = tmp_path / "vm.rw.export"
    data = bytearray(size)
    data[: len(stream)] = stream
    if header is not None:
        data[size - 512 : size - 512 + len(header)] = header
    disk.write_bytes(bytes(data))
    return disk


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "stops cleanly"),  # killed or crashed: the init never wrote one
        (b"BULKHEAD-EXPORT 1 " + b"f" * 32 + b" ok 1024\n", "stops cleanly"),  # another boot's nonce
        (b"BULKHEAD-EXPORT 1 " + NONCE.encode() + b" failed 0\n", "could not export"),
        (b"BULKHEAD-EXPORT 1 " + NONCE.encode() + b" ok 65536\n", "impossible length"),  # into the header
        (b"BULKHEAD-EXPORT 1 " + NONCE.encode() + b" ok 99999999999999\n", "impossible length"),
        (b"BULKHEAD-EXPORT 1 " + NONCE.encode() + b" ok 1000\n", "impossible length"),  # not whole sectors
        (b"BULKHEAD-EXPORT 1 " + NONCE.encode() + b" ok 0\n", "impossible length"),
        (b"BULKHEAD-EXPORT 1 " + NONCE.encode() + b" ok 1024\nmore", "stops cleanly"),
        (b"BULKHEAD-EXPORT 1 " + NONCE.encode() + b" ok -512\n", "stops cleanly"),
    ],
)
def test_it_refuses_an_export_whose_header_is_missing_or_wrong(
    tmp_path: Path, header: bytes | None, why: str
) -> None:
    with pytest.raises(ChangesNotExported, match=why):
        read_export_header(export_disk(tmp_path, b"x" * 2048, header), NONCE, name="vm")


def test_it_reads_exactly_the_announced_length_of_the_stream(tmp_path: Path) -> None:
    stream = bytes(range(256)) * 8  # 2048 bytes, then the rest of the disk
    disk = export_disk(tmp_path, stream + b"beyond", b"BULKHEAD-EXPORT 1 " + NONCE.encode() + b" ok 2048\n")
    exported = read_export_header(disk, NONCE, name="vm")
    assert b"".join(exported.chunks(chunk_size=700)) == stream


def tar_stream(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info


def device(name: str, kind: bytes, major: int, minor: int) -> tarfile.TarInfo:
    info = entry(name, kind)
    info.devmajor, info.devminor = major, minor
    return info


def hostile_streams(canary: Path) -> dict[str, bytes]:
    outside = str(canary.parent)
    return {
        "dot-dot": tar_stream((entry("../../escaped.txt"), b"x")),
        "absolute": tar_stream((entry(f"{outside}/escaped.txt"), b"x")),
        "through-symlink": tar_stream(
            (entry("out", tarfile.SYMTYPE, link=outside), b""), (entry("out/escaped.txt"), b"x")
        ),
        "hard-link-out": tar_stream((entry("stolen", tarfile.LNKTYPE, link=str(canary)), b"")),
        "hard-link-up": tar_stream((entry("stolen", tarfile.LNKTYPE, link="../../../canary"), b"")),
    }


# Device nodes are left out (and listed), not refused, as in any image layer: a guest's /dev/sda or
# /dev/mem in its changes becomes nothing on the host.
DEVICE_STREAMS = {
    "block-device": lambda: tar_stream((device("disk", tarfile.BLKTYPE, 8, 0), b"")),
    "char-device": lambda: tar_stream((device("mem", tarfile.CHRTYPE, 1, 1), b"")),
}


@pytest.mark.parametrize("kind", list(DEVICE_STREAMS))
def test_it_leaves_device_nodes_of_an_export_out(tmp_path: Path, kind: str) -> None:
    stream = DEVICE_STREAMS[kind]()
    header = f"BULKHEAD-EXPORT 1 {NONCE} ok {len(stream)}\n".encode()
    exported = read_export_header(export_disk(tmp_path, stream, header), NONCE, name="vm")
    upper = unpack_exported_changes(
        exported, LayerStore(tmp_path / "store", durable=False), lease_name="test"
    )
    assert not any(path.is_block_device() or path.is_char_device() for path in upper.rglob("*"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store", "vm.rw.export"]


@pytest.mark.parametrize("kind", list(hostile_streams(Path("/nowhere/canary"))))
def test_it_refuses_a_hostile_export_stream_and_touches_nothing_outside(tmp_path: Path, kind: str) -> None:
    canary = tmp_path / "canary"
    canary.write_bytes(b"host secret\n")
    stream = hostile_streams(canary)[kind]
    header = f"BULKHEAD-EXPORT 1 {NONCE} ok {len(stream)}\n".encode()
    exported = read_export_header(export_disk(tmp_path, stream, header), NONCE, name="vm")
    store = LayerStore(tmp_path / "store", durable=False)
    with pytest.raises(UnsafeEntry):
        unpack_exported_changes(exported, store, lease_name="test")
    assert canary.read_bytes() == b"host secret\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["canary", "store", "vm.rw.export"]
    assert list((tmp_path / "store" / "layers" / "sha256").iterdir()) == []


def test_it_takes_a_benign_export_in_as_an_upper_dir(tmp_path: Path) -> None:
    whiteout = entry("./etc/motd", tarfile.CHRTYPE)  # busybox tar writes overlay's 0/0 whiteouts as is
    stream = tar_stream(
        (entry("./", tarfile.DIRTYPE, mode=0o755), b""),
        (entry("./etc", tarfile.DIRTYPE, mode=0o755), b""),
        (whiteout, b""),
        (entry("./etc/.wh..wh..opq"), b""),
        (entry("./mine.txt"), b"mine\n"),
        (entry("./mine-link.txt", tarfile.LNKTYPE, link="./mine.txt"), b""),
    )
    header = f"BULKHEAD-EXPORT 1 {NONCE} ok {len(stream)}\n".encode()
    exported = read_export_header(export_disk(tmp_path, stream, header), NONCE, name="vm")
    upper = unpack_exported_changes(exported, LayerStore(tmp_path / "store", durable=False), lease_name="t")
    assert (upper / "mine.txt").read_bytes() == (upper / "mine-link.txt").read_bytes() == b"mine\n"
    assert (upper / "mine.txt").stat().st_ino == (upper / "mine-link.txt").stat().st_ino
    motd = (upper / "etc" / "motd").lstat()
    assert (motd.st_rdev, oct(motd.st_mode)[:4]) == (0, "0o20")
