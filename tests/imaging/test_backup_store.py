"""The deduplicating backup store (issue 17) through its Python door, on real directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imaging.store import BackupStore, DigestMismatch, NotFound, UnsafeEntry


def tree(root: Path) -> Path:
    (root / "db" / "base").mkdir(parents=True)
    (root / "db" / "base" / "table").write_bytes(os.urandom(3 << 20))
    (root / "db" / "config").write_text("shared_buffers = 128MB\n")
    (root / "db" / "config").chmod(0o600)
    os.link(root / "db" / "config", root / "db" / "config.bak")
    (root / "latest").symlink_to("db/base/table")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str]]:
    out: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        content: bytes | str = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else b""
        out[str(p.relative_to(root))] = (st.st_mode, content)
    return out


@pytest.fixture
def store(tmp_path: Path) -> BackupStore:
    return BackupStore(tmp_path / "store", durable=False)


def test_it_restores_a_backup_exactly(store: BackupStore, tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    result = store.backup(src)
    store.restore(result.manifest, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(src)
    assert (tmp_path / "out/db/config").stat().st_ino == (tmp_path / "out/db/config.bak").stat().st_ino


def test_it_writes_nothing_new_for_an_unchanged_tree(store: BackupStore, tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    first = store.backup(src)
    second = store.backup(src, previous=first.manifest)
    assert second.new_chunk_bytes == 0
    assert second.bytes_read == 0
    assert second.manifest == first.manifest
    assert first.new_chunk_bytes > 0 and first.dedup_ratio > 0


def test_it_shares_chunks_between_backups_of_different_trees(store: BackupStore, tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    store.backup(src)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "same-table").write_bytes((src / "db/base/table").read_bytes())
    assert store.backup(copy).new_chunk_bytes == 0


def test_it_names_a_tampered_chunk_on_verify_and_refuses_to_restore_it(
    store: BackupStore, tmp_path: Path
) -> None:
    src = tree(tmp_path / "src")
    result = store.backup(src)
    digest, _, _ = store.chunks(result.manifest)[0]
    path = store.chunk_path(digest)
    path.write_bytes(path.read_bytes()[:-8] + b"tampered")
    report = store.verify(result.manifest)
    assert [d for d, _ in report.bad] == [digest]
    with pytest.raises(DigestMismatch):
        store.restore(result.manifest, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_it_refuses_a_hostile_manifest_that_climbs_out(store: BackupStore, tmp_path: Path) -> None:
    hostile = {
        "version": 1,
        "chunking": "",
        "totals": {"entries": 2, "files": 0, "bytes": 0},
        "entries": [
            {"path": "", "type": "dir", "mode": 0o755},
            {"path": "escape", "type": "symlink", "target": str(tmp_path / "victim")},
            {"path": "escape/planted", "type": "fifo", "mode": 0o644},
        ],
    }
    with pytest.raises(UnsafeEntry):
        store.put_manifest(json.dumps(hostile).encode())
    hostile["entries"] = [{"path": "../planted", "type": "fifo", "mode": 0o644}]
    with pytest.raises(UnsafeEntry):
        store.put_manifest(json.dumps(hostile).encode())
    assert not (tmp_path / "victim").exists() and not (tmp_path / "planted").exists()


def test_it_exports_a_tar_zst_that_tar_reads(store: BackupStore, tmp_path: Path) -> None:
    import tarfile

    import zstandard

    src = tree(tmp_path / "src")
    result = store.backup(src)
    out = tmp_path / "backup.tar.zst"
    assert store.export_tar(result.manifest, path=out) == out.stat().st_size
    with (
        out.open("rb") as f,
        zstandard.ZstdDecompressor().stream_reader(f) as z,
        tarfile.open(fileobj=z, mode="r|") as t,
    ):
        names = {m.name: m for m in t}
    assert names["db/config.bak"].islnk() and names["latest"].issym()
    assert names["db/base/table"].size == 3 << 20


def test_it_fetches_missing_chunks_only_when_they_match(store: BackupStore, tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    result = store.backup(src)
    other = BackupStore(tmp_path / "other-host", durable=False)
    with pytest.raises(NotFound):
        other.manifest_bytes(result.manifest)
    assert other.put_manifest(store.manifest_bytes(result.manifest)) == result.manifest
    missing = other.missing_chunks(result.manifest)
    assert {d for d, _, _ in missing} == {d for d, _, _ in store.chunks(result.manifest)}
    first, length, _ = missing[0]
    second = missing[1][0]
    with pytest.raises(DigestMismatch):
        other.add_chunk(first, length, store.chunk_path(second).read_bytes())
    for digest, length, _ in missing:
        assert other.add_chunk(digest, length, store.chunk_path(digest).read_bytes())
    other.restore(result.manifest, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(src)
