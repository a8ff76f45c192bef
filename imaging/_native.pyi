"""Typed stubs for the Rust module ``imaging._native`` (the content-addressed layer store).

Only ``imaging/store.py`` imports this module; the rest of Bulkhead uses ``imaging.store.LayerStore``.
Digests are strings of the form ``"sha256:<64 lowercase hex digits>"``; anything else raises
``ValueError``.
"""

from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal

_Path = str | PathLike[str]

class StoreError(Exception):
    """Base of every layer-store error. I/O failures carry ``errno`` when the OS gave one."""

    errno: int

class DigestMismatch(StoreError):
    """Content did not hash to the promised digest (blob digest or layer DiffID)."""

    expected: str
    actual: str

class SizeMismatch(StoreError):
    """Content was not the promised number of bytes."""

    expected: int
    actual: int

class UnsafeEntry(StoreError):
    """An archive entry was refused; nothing of the layer was kept."""

    path: str
    """The entry's name as it appeared in the archive (lossily decoded)."""
    reason: str
    """A short fixed phrase, e.g. ``"path traverses a symlink"``."""

class LimitExceeded(StoreError):
    """A size, entry-count, name-length, depth or decompression-ratio limit was exceeded."""

class NotFound(StoreError):
    """A blob or layer that the call needs is not in the store."""

class LayerResult:
    """The outcome of unpacking one layer."""

    @property
    def diff_id(self) -> str:
        """``sha256:`` digest of the uncompressed tar stream."""
    @property
    def size(self) -> int:
        """Bytes of the uncompressed tar stream."""
    @property
    def entries(self) -> int:
        """Tar entries materialised (whiteouts included)."""
    @property
    def stripped(self) -> int:
        """setuid/setgid bits and ``security.capability`` xattrs removed by policy."""
    @property
    def skipped_devices(self) -> list[str]:
        """Device nodes and FIFOs left out by policy (escaped names; the runtimes supply ``/dev``)."""
    @property
    def skipped(self) -> bool:
        """True if the layer was already unpacked and no work was done."""

class Store:
    """A content-addressed layer store rooted at ``root``.

    Creates ``root/blobs/sha256``, ``root/ingest``, ``root/layers/sha256`` and ``root/disks``.
    ``allow_devices`` lets layers create device nodes and FIFOs (whiteouts are always allowed);
    ``allow_setid`` keeps setuid/setgid bits and file capabilities (otherwise stripped).
    Limits default to 16 GiB uncompressed per layer, 2,000,000 entries, 4096-byte names and a
    500:1 decompression ratio (judged once a layer is past 64 MiB uncompressed).
    ``durable`` fsyncs blobs and syncs unpacked layers (one ``syncfs`` per batch) before they
    become visible.
    """

    def __init__(
        self,
        root: _Path,
        allow_devices: bool = False,
        allow_setid: bool = False,
        max_layer_bytes: int | None = None,
        max_entries: int | None = None,
        max_name_len: int = 4096,
        max_ratio: int | None = None,
        durable: bool = True,
    ) -> None: ...
    @property
    def root(self) -> Path:
        """The store's root directory."""
    def ingest_path(
        self,
        path: _Path,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        consume: bool = False,
    ) -> tuple[str, int]:
        """Stores a file as a blob; returns ``(digest, size)``.

        With ``expected_digest`` of a present blob, returns at once without reading. Otherwise
        the data is written to ``ingest/`` (with O_DIRECT in a durable store), hashed on the
        way, verified, fsynced and renamed into ``blobs/sha256``; on mismatch the partial file
        is removed and ``DigestMismatch`` or ``SizeMismatch`` raised. GIL released.

        ``consume=True``: the file is moved into ``ingest/`` (same filesystem), hashed in place,
        fsynced and renamed into ``blobs/sha256``; it is removed from ``path`` whatever the
        outcome. Falls back to copying for another filesystem, a file with other hard links or
        another owner. A file that changes while hashed raises ``ValueError``, as does a path
        that is not a regular file (a symlink, a directory: left where it is).
        """
    def ingest_hashed(self, path: _Path, digest: str, size: int) -> tuple[str, int]:
        """Takes a file whose digest the caller computed while writing every byte of it (moved into
        the store without reading it again); ``SizeMismatch`` if it is not ``size`` bytes."""
    def start_writeback(self, fd: int) -> None:
        """Queues writeback of what is dirty in an open file, not waiting for it."""
    def ingest_fd(
        self, fd: int, expected_digest: str | None = None, expected_size: int | None = None
    ) -> tuple[str, int]:
        """Like ``ingest_path`` but reads an open descriptor from its offset (not closed)."""
    def ingest_iter(
        self,
        chunks: Iterable[bytes | bytearray | memoryview],
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> tuple[str, int]:
        """Like ``ingest_path`` for a stream of chunks; the GIL is released per chunk."""
    def has_blob(self, digest: str) -> bool:
        """Whether the blob is present."""
    def blob_path(self, digest: str) -> Path:
        """Where the blob lives (present or not)."""
    def has_layer(self, diff_id: str) -> bool:
        """Whether the layer is unpacked."""
    def layer_path(self, diff_id: str) -> Path:
        """The unpacked tree of a layer, ``layers/sha256/<hex>/fs`` (an overlayfs lower dir)."""
    def stats(self) -> dict[str, int]:
        """Counters of work done through this object: ``bytes_written``, ``bytes_read``,
        ``blobs_written``, ``blobs_deduplicated``, ``layers_unpacked``, ``layers_skipped``,
        ``disks_built``."""
    def unpack_layers(self, layers: list[tuple[str, str, str | None]]) -> list[LayerResult]:
        """Unpacks ``(blob_digest, media_type, expected_diff_id)`` layers, in parallel, GIL released.

        Each layer is unpacked once into a temporary dir and renamed into place; a present layer
        is skipped. Hostile entries raise ``UnsafeEntry``/``LimitExceeded`` and leave nothing.
        A DiffID different from ``expected_diff_id`` raises ``DigestMismatch`` and leaves nothing.
        """
    def chain_dirs(self, diff_ids: list[str]) -> list[Path]:
        """The dirs to stack for a chain (bottom first): each layer's ``fs``, or where a layer's
        implicit directories resolve through a symlink of the layers below (chroot-style, as
        containerd and Docker apply layers), ``layers/chains/<chainid>/fs``: a variant built once
        from hard links to the layer's inodes. Raises ``UnsafeEntry`` for links that loop or
        lead through a non-directory, ``NotFound`` for a layer not unpacked. GIL released."""
    def build_disk(self, diff_ids: list[str], fs: Literal["erofs", "ext4"] = "erofs") -> Path:
        """Flattens the chain's dirs (``chain_dirs``) and builds ``disks/<chainid>.<fs>``; cached."""
    def diff_upper(
        self,
        upper_dir: _Path,
        compression: Literal["gzip", "zstd"] = "gzip",
        id_shift: tuple[int, int] | None = None,
    ) -> tuple[str, str, int]:
        """Writes an overlayfs upper dir as an OCI layer into the store.

        ``id_shift=(host_base, size)`` maps the host ids of a user-namespaced container back.

        Returns ``(blob_digest, diff_id, blob_size)``.
        """
    def changes(self, upper_dir: _Path, lower_dirs: Sequence[_Path] = ...) -> list[tuple[str, str]]:
        """``("A"|"C"|"D", "/path")`` for each entry of an upper dir against lowers (bottom first)."""
    def gc(
        self,
        keep_blobs: list[str],
        keep_layers: list[str],
        keep_disks: list[str],
        temp_max_age: float = 3600.0,
    ) -> dict[str, int]:
        """Removes blobs, layers and disks (by chain id) not named, and temporaries older than
        ``temp_max_age`` seconds. Returns ``removed_blobs``, ``removed_layers``,
        ``removed_disks``, ``removed_temps`` and ``freed_bytes``."""

class ChunkStore:
    """A deduplicating backup store: content-defined chunks (FastCDC, ~1 MiB average), each
    compressed with zstd and stored once under the sha256 of its uncompressed bytes, and JSON
    manifests of directory trees stored under the sha256 of their bytes. Every call that does I/O
    releases the GIL. ``durable`` syncs chunks and manifests before they become visible."""

    def __init__(self, root: _Path, level: int = 3, durable: bool = True) -> None: ...
    @property
    def root(self) -> Path: ...
    def backup(
        self,
        source: _Path,
        previous: str | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> dict[str, Any]:
        """Backs up a directory without following any symlink. With ``previous`` (an earlier
        manifest of the same tree) files whose size, mtime, ctime and inode are unchanged are not
        read. ``progress(bytes_done)`` is called every 64 MiB or so. Returns ``manifest`` (its
        digest), ``skipped`` (device nodes, sockets) and the counters ``entries``, ``files``,
        ``source_bytes``, ``bytes_read``, ``files_unchanged``, ``chunks``, ``new_chunks``,
        ``new_chunk_bytes`` (compressed bytes written), ``new_raw_bytes``, ``reused_chunks``,
        ``distinct_chunks`` and ``stored_bytes`` (compressed bytes of the backup's chunks)."""
    def manifest_bytes(self, manifest: str) -> bytes:
        """A stored manifest's JSON, checked against its digest (``NotFound`` if absent)."""
    def put_manifest(self, data: bytes) -> str:
        """Stores manifest JSON from elsewhere after validating it as hostile input; its digest."""
    def chunks(self, manifest: str) -> list[tuple[str, int, int]]:
        """The manifest's distinct chunks: ``(digest, length, stored_length)``."""
    def missing_chunks(self, manifest: str) -> list[tuple[str, int, int]]:
        """The manifest's chunks not in this store: ``(digest, length, stored_length)``."""
    def chunk_path(self, chunk: str) -> Path:
        """Where a chunk's zstd frame is (or would be) stored."""
    def add_chunk(self, chunk: str, length: int, data: bytes) -> bool:
        """Adds a chunk's zstd frame fetched from elsewhere after checking it inflates to
        ``length`` bytes with that digest (``DigestMismatch`` otherwise). False if present."""
    def restore(
        self,
        manifest: str,
        target: _Path,
        allow_setid: bool = False,
        progress: Callable[[int], object] | None = None,
    ) -> dict[str, int]:
        """Restores into an empty directory (created if missing). The manifest is validated as
        hostile input (``UnsafeEntry``), chunks are checked (``DigestMismatch``, ``NotFound``);
        on failure the target is left empty. Returns ``entries``, ``files``, ``bytes``."""
    def verify(self, manifest: str) -> tuple[int, int, list[tuple[str, str]]]:
        """Re-hashes every chunk: ``(chunks, bytes, [(digest, "missing" | reason)])``."""
    def export_tar(
        self, manifest: str, fd: int | None = None, path: _Path | None = None, level: int = 3
    ) -> int:
        """Streams the backup as one tar.zst to ``fd`` (left open) or a new file at ``path``;
        returns the bytes written."""
    def gc(self, keep_manifests: list[str], temp_max_age: float = 3600.0) -> tuple[int, int]:
        """Removes chunks and manifests not named by ``keep_manifests`` and old temporaries;
        ``(chunks_removed, bytes_freed)``."""

def chain_id(diff_ids: list[str]) -> str:
    """The OCI chain id of diff ids, bottom first."""
