"""The layer store with real layers: ingest, unpack, whiteouts, disks, commits, gc."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from imaging.store import (
    DigestMismatch,
    LayerSpec,
    LayerStore,
    NotFound,
    SizeMismatch,
    chain_id,
)

BUSYBOX = Path("/bin/busybox")
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = OCI_TAR + "+gzip"
OCI_ZSTD = OCI_TAR + "+zstd"
MTIME = 1_700_000_000

needs_disk_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkfs.erofs", "fsck.erofs", "mkfs.ext4", "debugfs")),
    reason="erofs-utils / e2fsprogs are not installed",
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LayerBuilder:
    """Builds a layer tar in memory with Python's tarfile (PAX format, as modern tools write)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 closed in bytes()

    def _info(self, name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.mtime = MTIME
        return ti

    def dir(self, name: str, mode: int = 0o755, **kw: int) -> LayerBuilder:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, **kw))
        return self

    def file(
        self, name: str, data: bytes, mode: int = 0o644, xattrs: dict[str, str] | None = None, **kw: int
    ) -> LayerBuilder:
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(data)
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.tar.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> LayerBuilder:
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)
        return self

    def hardlink(self, name: str, target: str) -> LayerBuilder:
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self.tar.addfile(ti)
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, compresslevel=6)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


MEDIA = {"none": OCI_TAR, "gzip": OCI_GZIP, "zstd": OCI_ZSTD}


def busybox_layer() -> bytes:
    """A busybox-static root filesystem with the metadata kinds an image carries."""
    b = LayerBuilder()
    for d in ("bin", "etc", "root", "home"):
        b.dir(d, 0o700 if d == "root" else 0o755)
    b.dir("tmp", 0o1777)
    b.dir("home/user", 0o750, uid=1000, gid=1000)
    b.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in ("sh", "ls", "cat", "echo"):
        b.symlink(f"bin/{applet}", "busybox")
    b.hardlink("bin/busybox.hard", "bin/busybox")
    b.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    b.file("home/user/notes", b"mine\n", 0o600, uid=1000, gid=1000, xattrs={"user.comment": "hello"})
    return b.bytes()


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    return LayerStore(tmp_path / "store")


def add_layer(store: LayerStore, tar: bytes, how: str = "gzip") -> tuple[str, str]:
    """Ingests a layer; returns (blob digest, media type)."""
    blob, _ = store.ingest_bytes(compress(tar, how))
    return blob, MEDIA[how]


# --- ingest --------------------------------------------------------------------------------------


def test_ingest_path_verifies_and_stores(store: LayerStore, tmp_path: Path) -> None:
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(3 << 20))
    digest, size = store.ingest_path(src, digest=sha256(src.read_bytes()), size=3 << 20)
    assert (digest, size) == (sha256(src.read_bytes()), 3 << 20)
    assert store.blob_path(digest).read_bytes() == src.read_bytes()
    assert list((store.root / "ingest").iterdir()) == []


def test_ingest_refuses_a_wrong_digest_and_leaves_nothing(store: LayerStore, tmp_path: Path) -> None:
    src = tmp_path / "blob"
    src.write_bytes(b"payload")
    wrong = sha256(b"something else")
    with pytest.raises(DigestMismatch) as err:
        store.ingest_path(src, digest=wrong)
    assert err.value.expected == wrong
    assert err.value.actual == sha256(b"payload")
    assert not store.has_blob(wrong) and not store.has_blob(sha256(b"payload"))
    assert list((store.root / "ingest").iterdir()) == []


def test_ingest_refuses_a_wrong_size(store: LayerStore) -> None:
    with pytest.raises(SizeMismatch) as err:
        store.ingest_chunks([b"12345"], size=4)
    assert err.value.expected == 4
    with pytest.raises(SizeMismatch):
        store.ingest_chunks([b"12345"], size=6)
    assert list((store.root / "ingest").iterdir()) == []


def test_ingest_fd_and_chunks_agree(store: LayerStore, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb") as f:
        by_fd = store.ingest_fd(f.fileno())
    by_chunks = store.ingest_chunks(data[i : i + 4096] for i in range(0, len(data), 4096))
    assert by_fd == by_chunks == (sha256(data), len(data))


def test_reimport_of_a_present_blob_reads_and_writes_nothing(store: LayerStore, tmp_path: Path) -> None:
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(1 << 20))
    digest, _ = store.ingest_path(src)
    before = store.stats()
    src.unlink()  # not even opened: the digest says it is present
    assert store.ingest_path(src, digest=digest) == (digest, 1 << 20)
    after = store.stats()
    assert after["bytes_written"] == before["bytes_written"]
    assert after["bytes_read"] == before["bytes_read"]
    assert after["blobs_deduplicated"] == before["blobs_deduplicated"] + 1


def test_two_threads_ingesting_the_same_blob_both_succeed_with_one_copy(store: LayerStore) -> None:
    data = os.urandom(8 << 20)
    barrier = threading.Barrier(2)
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def chunks() -> Iterator[bytes]:
        barrier.wait()
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]

    def worker() -> None:
        try:
            results.append(store.ingest_chunks(chunks()))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [(sha256(data), len(data))] * 2
    assert [p.name for p in (store.root / "blobs/sha256").iterdir()] == [sha256(data)[7:]]
    assert list((store.root / "ingest").iterdir()) == []


def test_malformed_digests_are_value_errors(store: LayerStore) -> None:
    with pytest.raises(ValueError):
        store.has_blob("sha256:../../etc/passwd")
    with pytest.raises(ValueError):
        store.ingest_bytes(b"x", digest="md5:abc")


# --- unpack --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_busybox_rootfs_unpacks_with_its_metadata(store: LayerStore, how: str) -> None:
    tar = busybox_layer()
    blob, media = add_layer(store, tar, how)
    [r] = store.unpack_layers([LayerSpec(blob, media, sha256(tar))])
    assert (r.diff_id, r.size, r.skipped) == (sha256(tar), len(tar), False)
    fs = store.layer_path(r.diff_id)
    assert (fs / "bin/busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.readlink(fs / "bin/sh") == "busybox"
    assert (fs / "bin/busybox.hard").stat().st_ino == (fs / "bin/busybox").stat().st_ino
    assert stat.S_IMODE((fs / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((fs / "root").stat().st_mode) == 0o700
    notes = (fs / "home/user/notes").stat()
    assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (1000, 1000, 0o600)
    assert notes.st_mtime == MTIME
    assert (fs / "home/user").stat().st_mtime == MTIME
    assert os.getxattr(fs / "home/user/notes", "user.comment") == b"hello"


def test_busybox_layer_runs(store: LayerStore) -> None:
    blob, media = add_layer(store, busybox_layer())
    [r] = store.unpack_layers([LayerSpec(blob, media)])
    out = subprocess.run(
        [
            "chroot",
            str(store.layer_path(r.diff_id)),
            "/bin/sh",
            "-c",
            "echo hello; ls /bin",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["hello", "busybox", "busybox.hard", "cat", "echo", "ls", "sh"]


def test_layers_unpack_once_and_in_parallel(store: LayerStore) -> None:
    tars = [LayerBuilder().file(f"layer{i}/f", os.urandom(100_000)).bytes() for i in range(4)]
    specs = [
        LayerSpec(*add_layer(store, t, how))
        for t, how in zip(tars, ["gzip", "zstd", "none", "gzip"], strict=True)
    ]
    first = store.unpack_layers(specs)
    assert [r.diff_id for r in first] == [sha256(t) for t in tars]
    assert not any(r.skipped for r in first)
    again = store.unpack_layers(specs)
    assert all(r.skipped for r in again)
    assert [(r.diff_id, r.size, r.entries) for r in again] == [(r.diff_id, r.size, r.entries) for r in first]
    assert store.stats()["layers_unpacked"] == 4


def test_compression_is_detected_by_magic_despite_the_media_type(store: LayerStore) -> None:
    tar = LayerBuilder().file("f", b"x").bytes()
    blob, _ = store.ingest_bytes(compress(tar, "zstd"))
    [r] = store.unpack_layers([LayerSpec(blob, "application/vnd.docker.image.rootfs.diff.tar.gzip")])
    assert r.diff_id == sha256(tar)
    with pytest.raises(ValueError):
        store.unpack_layers([LayerSpec(blob, "application/x-evil")])


def test_unpacking_a_missing_blob_is_not_found(store: LayerStore) -> None:
    with pytest.raises(NotFound):
        store.unpack_layers([LayerSpec(sha256(b"absent"), OCI_TAR)])


# --- whiteouts, disks ----------------------------------------------------------------------------


def base_and_upper(store: LayerStore) -> tuple[str, str]:
    base = (
        LayerBuilder()
        .dir("etc")
        .file("etc/a", b"a")
        .file("etc/b", b"b")
        .dir("opt")
        .dir("opt/x")
        .file("opt/x/y", b"y")
        .file("opt/keep", b"k")
        .bytes()
    )
    upper = (
        LayerBuilder()
        .dir("etc")
        .file("etc/.wh.a", b"")
        .dir("opt")
        .file("opt/.wh..wh..opq", b"")
        .file("opt/new", b"n")
        .bytes()
    )
    specs = [LayerSpec(*add_layer(store, base)), LayerSpec(*add_layer(store, upper, "zstd"))]
    return tuple(r.diff_id for r in store.unpack_layers(specs))  # type: ignore[return-value]


def test_whiteouts_and_opaque_dirs_are_stored_in_overlay_form(store: LayerStore) -> None:
    _, upper = base_and_upper(store)
    fs = store.layer_path(upper)
    st = (fs / "etc/a").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(fs / "opt", "trusted.overlay.opaque") == b"y"
    assert not (fs / "etc/.wh.a").exists() and not (fs / "opt/.wh..wh..opq").exists()


def test_overlay_mount_of_the_layers_hides_deleted_files(store: LayerStore, tmp_path: Path) -> None:
    base, upper = base_and_upper(store)
    target = tmp_path / "merged"
    target.mkdir()
    lower = f"{store.layer_path(upper)}:{store.layer_path(base)}"
    mount = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(target)])
    if mount.returncode != 0:
        pytest.skip("overlayfs mounts are not available here")
    try:
        assert sorted(os.listdir(target / "etc")) == ["b"]
        assert sorted(os.listdir(target / "opt")) == ["new"]
    finally:
        subprocess.run(["umount", str(target)], check=True)


def extract_disk(image: Path, out: Path) -> None:
    if image.suffix == ".erofs":
        subprocess.run(["fsck.erofs", f"--extract={out}", str(image)], check=True, capture_output=True)
    else:
        out.mkdir()
        subprocess.run(["debugfs", "-R", f"rdump / {out}", str(image)], check=True, capture_output=True)


@needs_disk_tools
@pytest.mark.parametrize("fs", ["erofs", "ext4"])
def test_build_disk_applies_whiteouts_for_real(store: LayerStore, tmp_path: Path, fs: str) -> None:
    base, upper = base_and_upper(store)
    image = store.build_disk([base, upper], fs=fs)  # type: ignore[arg-type]
    assert image == store.disk_path([base, upper], fs=fs)  # type: ignore[arg-type]
    assert image.name == chain_id([base, upper])[7:] + "." + fs
    out = tmp_path / "extracted"
    extract_disk(image, out)
    assert sorted(os.listdir(out / "etc")) == ["b"]
    assert sorted(os.listdir(out / "opt")) == ["new"]
    assert "trusted.overlay.opaque" not in os.listxattr(out / "opt")
    # Cached by chain id: a second call builds nothing.
    assert store.build_disk([base, upper], fs=fs) == image  # type: ignore[arg-type]
    assert store.stats()["disks_built"] == 1


def disk_links(image: Path, path: str) -> int:
    """The link count of a file inside a disk image, read by the filesystem's own tool."""
    if image.suffix == ".erofs":
        cmd = ["dump.erofs", f"--path={path}", str(image)]
    else:
        cmd = ["debugfs", "-R", f"stat {path}", str(image)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.split("Links:")[1].split()[0])


def disk_xattr(image: Path, path: str, key: str, scratch: Path) -> bytes:
    """An xattr of a file inside a disk image (extraction tools drop xattrs, so read it in place)."""
    if image.suffix == ".ext4":
        cmd = ["debugfs", "-R", f"ea_get {path} {key}", str(image)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return out.split(" = ", 1)[1].strip().strip('"').encode()
    mnt = scratch / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(mnt)]).returncode != 0:
        pytest.skip("cannot loop-mount erofs here")
    try:
        return os.getxattr(mnt / path.lstrip("/"), key)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@needs_disk_tools
@pytest.mark.parametrize("fs", ["erofs", "ext4"])
def test_busybox_disk_keeps_files_and_links(store: LayerStore, tmp_path: Path, fs: str) -> None:
    blob, media = add_layer(store, busybox_layer())
    [r] = store.unpack_layers([LayerSpec(blob, media)])
    image = store.build_disk([r.diff_id], fs=fs)  # type: ignore[arg-type]
    out = tmp_path / "x"
    extract_disk(image, out)
    assert (out / "bin/busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.readlink(out / "bin/sh") == "busybox"
    assert (out / "home/user/notes").stat().st_uid == 1000
    assert disk_xattr(image, "/home/user/notes", "user.comment", tmp_path) == b"hello"
    # Layer files are hard-linked into the flattened tree; the image counts only its own links.
    assert disk_links(image, "/bin/busybox") == 2
    assert disk_links(image, "/etc/passwd") == 1


def test_build_disk_needs_unpacked_layers(store: LayerStore) -> None:
    with pytest.raises(NotFound):
        store.build_disk([sha256(b"nope")])


def test_chain_id_follows_the_oci_spec() -> None:
    a, b, c = (sha256(x) for x in (b"a", b"b", b"c"))
    ab = sha256(f"{a} {b}".encode())
    assert chain_id([a]) == a
    assert chain_id([a, b, c]) == sha256(f"{ab} {c}".encode())


# --- upper dirs: changes and commit --------------------------------------------------------------


def make_upper(root: Path) -> Path:
    """An overlayfs upper dir as a container leaves it."""
    up = root / "upper"
    (up / "etc").mkdir(parents=True)
    (up / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nnew:x:1:1::/:/bin/sh\n")
    os.mknod(up / "etc/b", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (up / "opt").mkdir()
    os.setxattr(up / "opt", "trusted.overlay.opaque", b"y")
    (up / "opt/fresh").write_bytes(b"fresh")
    (up / "data").mkdir()
    (up / "data/one").write_bytes(b"1" * 5000)
    os.link(up / "data/one", up / "data/two")
    os.symlink("/etc/passwd", up / "data/link")
    os.setxattr(up / "data/one", "user.tag", b"t")
    return up


def test_changes_against_the_lowers(store: LayerStore, tmp_path: Path) -> None:
    base, _ = base_and_upper(store)
    got = {(c.kind, c.path) for c in store.changes(make_upper(tmp_path), [base])}
    assert ("C", "/etc") in got
    assert ("A", "/etc/passwd") in got
    assert ("D", "/etc/b") in got
    assert ("C", "/opt") in got
    assert ("A", "/opt/fresh") in got
    assert ("A", "/data/two") in got


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_diff_upper_writes_an_oci_layer_that_round_trips(store: LayerStore, tmp_path: Path, how: str) -> None:
    up = make_upper(tmp_path)
    committed = store.diff_upper(up, compression=how)  # type: ignore[arg-type]
    blob = store.read_blob(committed.blob_digest)
    assert committed.size == len(blob)
    raw = (
        gzip.decompress(blob)
        if how == "gzip"
        else zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    )
    assert committed.diff_id == sha256(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        members = {m.name: m for m in t.getmembers()}
    assert "etc/.wh.b" in members and members["etc/.wh.b"].isfile()
    assert "opt/.wh..wh..opq" in members
    assert members["data/two"].islnk() and members["data/two"].linkname == "data/one"
    assert members["data/link"].issym()
    assert members["data/one"].pax_headers.get("SCHILY.xattr.user.tag") == "t"
    assert not any("overlay" in k for m in members.values() for k in m.pax_headers)

    [r] = store.unpack_layers([LayerSpec(committed.blob_digest, committed.media_type, committed.diff_id)])
    fs = store.layer_path(r.diff_id)
    assert stat.S_ISCHR((fs / "etc/b").lstat().st_mode)
    assert os.getxattr(fs / "opt", "trusted.overlay.opaque") == b"y"
    assert (fs / "data/two").stat().st_ino == (fs / "data/one").stat().st_ino
    assert (fs / "etc/passwd").read_bytes() == (up / "etc/passwd").read_bytes()


def test_diff_upper_does_not_follow_symlinks_out(store: LayerStore, tmp_path: Path) -> None:
    up = tmp_path / "upper"
    up.mkdir()
    secret = tmp_path / "host-secret"
    secret.mkdir()
    (secret / "key").write_text("do not leak")
    os.symlink(secret, up / "escape")
    committed = store.diff_upper(up)
    raw = gzip.decompress(store.read_blob(committed.blob_digest))
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        assert [m.name for m in t.getmembers()] == ["escape"]
    assert b"do not leak" not in raw


# --- gc and leases -------------------------------------------------------------------------------


@needs_disk_tools
def test_gc_removes_what_nothing_names(store: LayerStore) -> None:
    tar = busybox_layer()
    blob, media = add_layer(store, tar)
    [r] = store.unpack_layers([LayerSpec(blob, media)])
    disk = store.build_disk([r.diff_id])
    junk, _ = store.ingest_bytes(b"unreferenced")
    report = store.gc(keep_blobs=[blob], keep_layers=[r.diff_id], keep_disks=[r.diff_id])
    assert (report.removed_blobs, report.removed_layers, report.removed_disks) == (1, 0, 0)
    assert not store.has_blob(junk) and store.has_blob(blob) and disk.exists()
    report = store.gc()
    assert (report.removed_blobs, report.removed_layers, report.removed_disks) == (1, 1, 1)
    assert report.freed_bytes > len(tar)
    assert not store.has_layer(r.diff_id)


def test_gc_keeps_what_a_lease_names_until_it_is_released(store: LayerStore) -> None:
    digest, _ = store.ingest_bytes(b"in use by an import")
    with store.lease("import-42", [digest], ttl=60):
        assert store.gc().removed_blobs == 0
        assert store.has_blob(digest)
    assert store.gc().removed_blobs == 1


def test_expired_leases_protect_nothing(store: LayerStore) -> None:
    digest, _ = store.ingest_bytes(b"stale")
    store.acquire_lease("crashed-worker", [digest], ttl=-1)
    assert store.gc().removed_blobs == 1
    assert not list((store.root / "leases").glob("*.json"))


def test_gc_spares_young_temporaries_and_removes_old_ones(store: LayerStore) -> None:
    partial = store.root / "ingest" / "blob-inflight"
    partial.write_bytes(b"half")
    assert store.gc().removed_temps == 0
    old = time.time() - 7200
    os.utime(partial, (old, old))
    assert store.gc().removed_temps == 1


def test_a_lease_taken_during_gc_waits_for_it(store: LayerStore) -> None:
    # gc holds the lock exclusively; a lease written meanwhile must land after gc decided.
    with store._lock(fcntl.LOCK_EX):
        t = threading.Thread(target=store.acquire_lease, args=("late",))
        t.start()
        t.join(timeout=0.3)
        assert t.is_alive(), "the lease was written while gc held the lock"
        assert not (store.root / "leases/late.json").exists()
    t.join(timeout=10)
    assert (store.root / "leases/late.json").exists()
