"""Hostile layers: every case in hostile.py is refused (or neutralised) without touching the host."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import zstandard

from imaging.store import LayerSpec, LayerStore, LimitExceeded, UnsafeEntry

try:
    from tests.imaging import hostile
except ImportError:  # collected without the tests package on sys.path
    import hostile  # type: ignore[no-redef]

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "raw": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def snapshot(root: Path) -> list[tuple[str, int, bytes]]:
    """Every path under root with its mode and (for files) content."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out.append((str(p.relative_to(root)), st.st_mode, data))
    return sorted(out)


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    c = tmp_path / "canary"
    c.mkdir()
    (c / "victim").write_text("must survive\n")
    (c / "sub").mkdir()
    return c


def leftover_layer_dirs(store_root: Path) -> list[str]:
    layers = store_root / "layers"
    return sorted(
        [p.name for p in layers.iterdir() if p.name not in ("sha256", "by-blob", "chains")]
        + [p.name for p in (layers / "sha256").iterdir()]
        + [p.name for p in (layers / "chains").iterdir()]
    )


def test_the_corpus_is_large_and_named_uniquely() -> None:
    assert len(hostile.CASES) >= 30
    assert len(set(hostile.CASE_IDS)) == len(hostile.CASE_IDS)


@pytest.mark.parametrize("case", hostile.CASES, ids=hostile.CASE_IDS)
def test_hostile_layer_is_contained(case: hostile.Case, tmp_path: Path, canary: Path) -> None:
    before = snapshot(canary)
    store = LayerStore(tmp_path / "store", **case.store_kw)
    data = case.build(canary)
    if case.compress == "zstd":
        data = zstandard.ZstdCompressor(level=3).compress(data)
    blob, _ = store.ingest_bytes(data)
    spec = LayerSpec(blob_digest=blob, media_type=MEDIA[case.compress])

    if case.expect == "unsafe":
        with pytest.raises(UnsafeEntry) as err:
            store.unpack_layers([spec])
        assert err.value.reason == case.reason
        assert err.value.path == hostile.expected_path(case, canary)
    elif case.expect == "limit":
        with pytest.raises(LimitExceeded):
            store.unpack_layers([spec])
    else:
        [result] = store.unpack_layers([spec])
        assert case.verify is not None
        case.verify(store.layer_path(result.diff_id))

    assert snapshot(canary) == before, "the canary outside the store changed"
    assert not list(tmp_path.rglob("pwned")), "an attack payload landed somewhere"
    if case.expect != "neutralised":
        assert leftover_layer_dirs(tmp_path / "store") == [], "a partial layer was left behind"


def test_neutralised_layers_report_what_was_stripped(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    tar = hostile.archive(hostile.member("bin/su", b"#!", mode=0o4755), hostile.member("bin/ok", b"#!"))
    blob, _ = store.ingest_bytes(tar)
    [result] = store.unpack_layers([LayerSpec(blob)])
    assert result.stripped == 1
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_policy_can_allow_devices_and_setid(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store", allow_devices=True, allow_setid=True)
    tar = hostile.archive(
        hostile.member("dev/null", kind=b"3", devmajor=1, devminor=3, mode=0o666),
        hostile.member("run/pipe", kind=b"6", mode=0o600),
        hostile.member("bin/su", b"#!", mode=0o4755),
    )
    blob, _ = store.ingest_bytes(tar)
    [result] = store.unpack_layers([LayerSpec(blob)])
    fs = store.layer_path(result.diff_id)
    st = (fs / "dev/null").lstat()
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert (fs / "bin/su").stat().st_mode & 0o7777 == 0o4755
    assert result.stripped == 0


def test_expected_diff_id_mismatch_leaves_nothing(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    blob, _ = store.ingest_bytes(hostile.archive(hostile.member("f", b"x")))
    from imaging.store import DigestMismatch

    with pytest.raises(DigestMismatch) as err:
        store.unpack_layers([LayerSpec(blob, diff_id="sha256:" + "0" * 64)])
    assert err.value.expected == "sha256:" + "0" * 64
    assert leftover_layer_dirs(tmp_path / "store") == []


def test_device_nodes_are_left_out_and_listed_not_refused(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    tar = hostile.archive(
        hostile.member("./dev/", kind=b"5", mode=0o755),
        hostile.member("./dev/full", kind=b"3", devmajor=1, devminor=7, mode=0o666),
        hostile.member("./dev/null", kind=b"3", devmajor=1, devminor=3, mode=0o666),
        hostile.member("./bin/su", b"#!", mode=0o4755),
    )
    blob, _ = store.ingest_bytes(tar)
    [result] = store.unpack_layers([LayerSpec(blob)])
    assert result.skipped_devices == ["./dev/full", "./dev/null"]
    fs = store.layer_path(result.diff_id)
    assert list((fs / "dev").iterdir()) == []
    assert (fs / "bin/su").stat().st_mode & 0o7777 == 0o755  # set-id bits still stripped
    # The list is kept with the layer: a second import of it reports the same.
    [again] = LayerStore(tmp_path / "store").unpack_layers([LayerSpec(blob)])
    assert again.skipped and again.skipped_devices == ["./dev/full", "./dev/null"]


def test_a_root_entry_cannot_make_the_store_directories_writable_to_others(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    tar = hostile.archive(
        hostile.member("./", kind=b"5", mode=0o777), hostile.member("./tmp/", kind=b"5", mode=0o1777)
    )
    blob, _ = store.ingest_bytes(tar)
    [result] = store.unpack_layers([LayerSpec(blob)])
    fs = store.layer_path(result.diff_id)
    for directory in (fs, fs.parent, fs.parent.parent, fs.parent.parent.parent):
        assert directory.stat().st_mode & 0o022 == 0, f"{directory} is writable by others"
    assert (fs / "tmp").stat().st_mode & 0o7777 == 0o1777  # the layer's own entries keep their modes


def test_a_claimed_diff_id_does_not_reuse_a_layer_the_blob_never_produced(tmp_path: Path) -> None:
    from imaging.store import DigestMismatch

    store = LayerStore(tmp_path / "store")
    secret_blob, _ = store.ingest_bytes(hostile.archive(hostile.member("secret", b"globex only\n")))
    [secret] = store.unpack_layers([LayerSpec(secret_blob)])
    forged_tar = hostile.archive(hostile.member("x", b""))
    forged_blob, _ = store.ingest_bytes(forged_tar)
    with pytest.raises(DigestMismatch) as err:
        store.unpack_layers([LayerSpec(forged_blob, diff_id=secret.diff_id)])
    assert err.value.actual == "sha256:" + hashlib.sha256(forged_tar).hexdigest()
    # The store remembers what the forged blob really is, in another process as well.
    reopened = LayerStore(tmp_path / "store")
    with pytest.raises(DigestMismatch):
        reopened.unpack_layers([LayerSpec(forged_blob, diff_id=secret.diff_id)])
    [proven] = reopened.unpack_layers([LayerSpec(secret_blob, diff_id=secret.diff_id)])
    assert proven.skipped
    assert leftover_layer_dirs(tmp_path / "store") == [secret.diff_id.removeprefix("sha256:")]
