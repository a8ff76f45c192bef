"""``LayerStore.ingest_path(..., consume=True)``: a file handed over is moved into the store, not copied."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from imaging.store import DigestMismatch, LayerStore


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    return LayerStore(tmp_path / "store")


def test_consume_moves_the_file_into_the_store(store: LayerStore) -> None:
    # An upload temp file lives in the store's ingest area, as imaging.services puts it.
    src = store.root / "ingest" / "upload-abc.tar"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    inode = src.stat().st_ino
    before = store.stats()
    digest, size = store.ingest_path(src, digest=sha256(data), size=len(data), consume=True)
    assert (digest, size) == (sha256(data), len(data))
    assert not src.exists()
    blob = store.blob_path(digest)
    assert blob.stat().st_ino == inode  # the same file: nothing was copied
    assert blob.read_bytes() == data
    assert blob.stat().st_mode & 0o777 == 0o644
    after = store.stats()
    assert after["bytes_written"] == before["bytes_written"]
    assert after["bytes_read"] == before["bytes_read"] + len(data)
    assert list((store.root / "ingest").iterdir()) == []


def test_consume_of_a_wrong_file_removes_it_and_stores_nothing(store: LayerStore) -> None:
    src = store.root / "ingest" / "upload-bad.tar"
    src.write_bytes(b"payload")
    with pytest.raises(DigestMismatch):
        store.ingest_path(src, digest=sha256(b"other"), consume=True)
    assert not src.exists()
    assert list((store.root / "ingest").iterdir()) == []
    assert list((store.root / "blobs" / "sha256").iterdir()) == []


def test_consume_copies_a_file_with_another_name(store: LayerStore, tmp_path: Path) -> None:
    src = store.root / "ingest" / "upload-shared.tar"
    src.write_bytes(b"shared bytes")
    other = store.root / "elsewhere"
    os.link(src, other)
    digest, _ = store.ingest_path(src, consume=True)
    assert not src.exists()
    assert store.blob_path(digest).stat().st_ino != other.stat().st_ino
    other.write_bytes(b"changed later")  # cannot reach the stored blob
    assert store.blob_path(digest).read_bytes() == b"shared bytes"


def test_consume_refuses_a_symlink_and_leaves_it(store: LayerStore, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    link = store.root / "ingest" / "upload-link.tar"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="is a symlink"):
        store.ingest_path(link, consume=True)
    assert link.is_symlink() and target.read_bytes() == b"keep"
