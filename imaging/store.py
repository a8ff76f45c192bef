"""The layer store: Bulkhead's only door to the Rust module ``imaging._native``.

Layout under the store root (see imaging/native/src/store.rs)::

    blobs/sha256/<hex>          verified blobs        ingest/<random>     partial writes
    layers/sha256/<hex>/fs      unpacked layers       disks/<chain>.<fs>  flattened disks
    layers/chains/<chain>/fs    a layer as stacked on a chain it writes through symlinks of
    leases/<name>.json          what work in progress uses (honoured by gc)

Untrusted images are unpacked safely by the Rust side: no entry can reach outside its layer,
device nodes are refused unless allowed, and setuid/setgid bits and file capabilities are
**stripped** (not refused) unless ``allow_setid`` is set, so ordinary distribution images import.

Leases keep garbage collection away from work in progress: take a lease naming the digests you are
about to use *before* checking or fetching them, release it when done. ``gc`` holds an exclusive
lock while it reads the leases and deletes, and taking a lease waits for that lock, so a digest
named by a lease taken before or during a collection is never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imaging import _native

StoreError = _native.StoreError
DigestMismatch = _native.DigestMismatch
SizeMismatch = _native.SizeMismatch
UnsafeEntry = _native.UnsafeEntry
LimitExceeded = _native.LimitExceeded
NotFound = _native.NotFound
LayerResult = _native.LayerResult

__all__ = [
    "Change",
    "CommittedLayer",
    "DigestMismatch",
    "GcReport",
    "LayerResult",
    "LayerSpec",
    "LayerStore",
    "Lease",
    "LimitExceeded",
    "NotFound",
    "SizeMismatch",
    "StoreError",
    "UnsafeEntry",
    "chain_id",
]

DiskFormat = Literal["erofs", "ext4"]
Compression = Literal["gzip", "zstd"]

#: Disk format used when the caller does not choose (see bench/README-layers.md for why).
DEFAULT_DISK_FORMAT: DiskFormat = "erofs"

_LEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class LayerSpec:
    """A layer to unpack: its blob, media type and the DiffID the image config promises."""

    blob_digest: str
    media_type: str = ""
    diff_id: str | None = None


@dataclass(frozen=True)
class CommittedLayer:
    """A layer written from an upper dir: blob digest and size (for the manifest), DiffID (config)."""

    blob_digest: str
    diff_id: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Change:
    """One entry of an upper dir: ``kind`` is "A" (added), "C" (changed) or "D" (deleted)."""

    kind: Literal["A", "C", "D"]
    path: str


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection removed, and how many digests leases protected."""

    removed_blobs: int
    removed_layers: int
    removed_disks: int
    removed_temps: int
    freed_bytes: int
    leased: int = 0


@dataclass
class Lease:
    """A claim on digests (blobs, diff ids or chain ids) that gc must keep until it expires."""

    store: LayerStore
    name: str
    digests: set[str] = field(default_factory=set)
    expires_at: float = 0.0

    def add(self, *digests: str) -> None:
        """Adds digests to the lease (rewrites the lease file)."""
        self.digests.update(digests)
        self.store._write_lease(self)

    def renew(self, ttl: float) -> None:
        """Extends the lease to ``ttl`` seconds from now."""
        self.expires_at = time.time() + ttl
        self.store._write_lease(self)

    def release(self) -> None:
        """Removes the lease; its digests become collectable unless named elsewhere."""
        with contextlib.suppress(FileNotFoundError):
            self.store._lease_path(self.name).unlink()


def chain_id(diff_ids: Sequence[str]) -> str:
    """The OCI chain id of diff ids (bottom first)."""
    return _native.chain_id(list(diff_ids))


class LayerStore:
    """A content-addressed store of blobs, unpacked layers and flattened disks.

    ``durable`` (the default) fsyncs blobs and syncs unpacked layers before they become visible,
    so a power loss cannot leave a truncated file under a valid name; turn it off only for
    scratch stores (tests, benchmarks of raw speed).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        allow_devices: bool = False,
        allow_setid: bool = False,
        max_layer_bytes: int | None = None,
        max_entries: int | None = None,
        max_name_len: int = 4096,
        max_ratio: int | None = None,
        durable: bool = True,
    ) -> None:
        self._native = _native.Store(
            os.fspath(root),
            allow_devices=allow_devices,
            allow_setid=allow_setid,
            max_layer_bytes=max_layer_bytes,
            max_entries=max_entries,
            max_name_len=max_name_len,
            max_ratio=max_ratio,
            durable=durable,
        )
        self.root = Path(root)
        self._leases = self.root / "leases"
        self._leases.mkdir(exist_ok=True)

    # --- blobs -----------------------------------------------------------------------------

    def ingest_path(
        self,
        path: str | os.PathLike[str],
        *,
        digest: str | None = None,
        size: int | None = None,
        consume: bool = False,
    ) -> tuple[str, int]:
        """Stores a file as a blob and returns ``(digest, size)``.

        With ``digest`` of a blob already present this returns at once, reading and writing
        nothing. Raises ``DigestMismatch``/``SizeMismatch`` (leaving nothing behind).

        ``consume=True`` hands the file over: it is moved into the store's ingest area, hashed
        where it lies and renamed into place, so no byte is copied (on the store's filesystem;
        elsewhere it is copied). The file is gone from ``path`` afterwards whatever the outcome.
        Use it for files the caller made and no longer writes (e.g. an upload's temp file): an
        open writable descriptor to it must not remain. Other hard links or another owner make
        the store copy it instead; a size or time change while hashing raises ``ValueError``,
        as does a path that is not a regular file (left untouched).
        """
        return self._native.ingest_path(os.fspath(path), digest, size, consume)

    def ingest_hashed(self, path: str | os.PathLike[str], *, digest: str, size: int) -> tuple[str, int]:
        """Stores a file the caller wrote itself and hashed while writing: moved into place (fsynced
        once) without being read again. Only for files nothing else could write (an upload the
        caller received): the store checks the size, the single link and the owner, not the bytes.
        A file of another size raises ``SizeMismatch`` and is gone."""
        return self._native.ingest_hashed(os.fspath(path), digest, size)

    def start_writeback(self, fd: int) -> None:
        """Lets the kernel start writing an open file's dirty pages now, so that the fsync that
        makes it durable later has little left to wait for."""
        self._native.start_writeback(fd)

    def ingest_fd(self, fd: int, *, digest: str | None = None, size: int | None = None) -> tuple[str, int]:
        """Stores what an open descriptor yields from its current offset (the fd stays open)."""
        return self._native.ingest_fd(fd, digest, size)

    def ingest_chunks(
        self,
        chunks: Iterable[bytes | bytearray | memoryview],
        *,
        digest: str | None = None,
        size: int | None = None,
    ) -> tuple[str, int]:
        """Stores a stream of chunks (e.g. an HTTP body), hashing as it goes."""
        return self._native.ingest_iter(chunks, digest, size)

    def ingest_bytes(self, data: bytes, *, digest: str | None = None) -> tuple[str, int]:
        """Stores a small blob held in memory (configs, manifests)."""
        return self._native.ingest_iter([data], digest, len(data))

    def has_blob(self, digest: str) -> bool:
        """Whether the blob is present."""
        return self._native.has_blob(digest)

    def blob_path(self, digest: str) -> Path:
        """Where the blob lives (present or not)."""
        return Path(self._native.blob_path(digest))

    def read_blob(self, digest: str) -> bytes:
        """Reads a (small) blob; raises ``NotFound`` if absent."""
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest}") from None

    # --- layers and disks ------------------------------------------------------------------

    def unpack_layers(self, layers: Sequence[LayerSpec]) -> list[LayerResult]:
        """Unpacks layers once each (in parallel) into overlayfs lower dirs; present ones are skipped.

        Raises ``UnsafeEntry``, ``LimitExceeded``, ``DigestMismatch`` or ``NotFound``; a layer that
        fails leaves no directory behind.
        """
        return self._native.unpack_layers([(s.blob_digest, s.media_type, s.diff_id) for s in layers])

    def has_layer(self, diff_id: str) -> bool:
        """Whether a layer is unpacked."""
        return self._native.has_layer(diff_id)

    def layer_path(self, diff_id: str) -> Path:
        """The unpacked tree of a layer (use as an overlayfs lower dir)."""
        return Path(self._native.layer_path(diff_id))

    def lower_dirs(self, diff_ids: Sequence[str]) -> list[Path]:
        """Lower dirs for an overlay mount, bottom layer first (overlayfs wants top first: reverse).

        A layer that writes through a symlinked directory of the layers below it (``cur/file``
        over ``cur -> versions/1``) is given as this chain's variant of it, built once, with its
        files where containerd and Docker would have written them; every other layer as itself.
        Raises ``UnsafeEntry`` for a chain whose links loop or lead through a file, ``NotFound``
        for a layer that is not unpacked.
        """
        return [Path(p) for p in self._native.chain_dirs(list(diff_ids))]

    def build_disk(self, diff_ids: Sequence[str], fs: DiskFormat = DEFAULT_DISK_FORMAT) -> Path:
        """Builds (or finds) the read-only root disk of a layer chain (bottom first)."""
        return Path(self._native.build_disk(list(diff_ids), fs))

    def disk_path(self, diff_ids: Sequence[str], fs: DiskFormat = DEFAULT_DISK_FORMAT) -> Path:
        """Where the disk of a chain lives (built or not)."""
        return self.root / "disks" / f"{chain_id(diff_ids).removeprefix('sha256:')}.{fs}"

    def diff_upper(
        self,
        upper_dir: str | os.PathLike[str],
        *,
        compression: Compression = "gzip",
        id_shift: tuple[int, int] | None = None,
    ) -> CommittedLayer:
        """Commits an overlayfs upper dir as a new compressed OCI layer in the store.

        id_shift=(host_base, size): the upper dir of a user-namespaced container holds host ids;
        the layer gets the ids seen inside (host id - host_base; ids outside the range: nobody).
        """
        blob, diff_id, size = self._native.diff_upper(os.fspath(upper_dir), compression, id_shift)
        media = "application/vnd.oci.image.layer.v1.tar+" + compression
        return CommittedLayer(blob_digest=blob, diff_id=diff_id, size=size, media_type=media)

    def changes(self, upper_dir: str | os.PathLike[str], lower_diff_ids: Sequence[str] = ()) -> list[Change]:
        """What a container changed: entries of its upper dir against its image's layers."""
        lowers = [os.fspath(p) for p in self.lower_dirs(lower_diff_ids)] if lower_diff_ids else []
        return [
            Change(kind=kind, path=path)  # type: ignore[arg-type]
            for kind, path in self._native.changes(os.fspath(upper_dir), lowers)
        ]

    def stats(self) -> dict[str, int]:
        """Counters of work done through this object (bytes written, blobs deduplicated, ...)."""
        return self._native.stats()

    # --- leases and gc ---------------------------------------------------------------------

    def _lease_path(self, name: str) -> Path:
        return self._leases / f"{name}.json"

    @contextlib.contextmanager
    def _lock(self, mode: int) -> Iterator[None]:
        with open(self._leases / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), mode)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _write_lease(self, lease: Lease) -> None:
        body = json.dumps({"expires_at": lease.expires_at, "digests": sorted(lease.digests)})
        tmp = self._leases / f".{lease.name}.{os.getpid()}.tmp"
        # Shared lock: waits while a gc is deciding, so it either sees this lease or finished first.
        with self._lock(fcntl.LOCK_SH):
            tmp.write_text(body)
            os.replace(tmp, self._lease_path(lease.name))

    def acquire_lease(self, name: str, digests: Iterable[str] = (), *, ttl: float = 3600.0) -> Lease:
        """Takes (or replaces) the lease ``name`` on ``digests`` for ``ttl`` seconds."""
        if not _LEASE_NAME.match(name):
            raise ValueError(f"invalid lease name {name!r}")
        lease = Lease(store=self, name=name, digests=set(digests), expires_at=time.time() + ttl)
        self._write_lease(lease)
        return lease

    @contextlib.contextmanager
    def lease(self, name: str, digests: Iterable[str] = (), *, ttl: float = 3600.0) -> Iterator[Lease]:
        """A lease for the duration of a ``with`` block (e.g. an import or a workload start)."""
        lease = self.acquire_lease(name, digests, ttl=ttl)
        try:
            yield lease
        finally:
            lease.release()

    def leased_digests(self, now: float | None = None) -> set[str]:
        """Digests named by leases that have not expired."""
        now = time.time() if now is None else now
        out: set[str] = set()
        for p in self._leases.glob("*.json"):
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # a lease being replaced; the next gc sees it
            if float(data.get("expires_at", 0)) > now:
                out.update(d for d in map(str, data.get("digests", [])) if _DIGEST.match(d))
        return out

    def gc(
        self,
        *,
        keep_blobs: Iterable[str] = (),
        keep_layers: Iterable[str] = (),
        keep_disks: Iterable[str] = (),
        temp_max_age: float = 3600.0,
    ) -> GcReport:
        """Removes everything not named by the caller (what the database references) or a live
        lease, plus temporaries older than ``temp_max_age`` seconds. ``keep_disks`` are chain ids."""
        with self._lock(fcntl.LOCK_EX):
            leased = self.leased_digests()
            for p in self._leases.glob("*.json"):
                with contextlib.suppress(OSError, ValueError):
                    if float(json.loads(p.read_text()).get("expires_at", 0)) <= time.time():
                        p.unlink()
            r = self._native.gc(
                sorted(set(keep_blobs) | leased),
                sorted(set(keep_layers) | leased),
                sorted(set(keep_disks) | leased),
                temp_max_age,
            )
        return GcReport(leased=len(leased), **r)


@dataclass(frozen=True)
class BackupResult:
    """What one backup did (see ``BackupStore.backup``)."""

    manifest: str
    entries: int
    files: int
    source_bytes: int
    bytes_read: int
    files_unchanged: int
    chunks: int
    new_chunks: int
    new_chunk_bytes: int
    new_raw_bytes: int
    reused_chunks: int
    distinct_chunks: int
    stored_bytes: int
    skipped: list[str] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        """Source bytes per new compressed byte written (inf when nothing new was written)."""
        return self.source_bytes / self.new_chunk_bytes if self.new_chunk_bytes else float("inf")


@dataclass(frozen=True)
class VerifyResult:
    """What ``BackupStore.verify`` found: every chunk re-hashed, the bad ones named."""

    chunks: int
    bytes: int
    bad: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not self.bad


class BackupStore:
    """Deduplicated backups of directory trees (issue 17), beside the layer store.

    Layout under the root (see imaging/native/src/backup/mod.rs)::

        chunks/<2 hex>/<64 hex>   zstd frames named by the sha256 of their uncompressed bytes
        manifests/<64 hex>        JSON manifests named by the sha256 of their bytes
        tmp/<random>              writes in progress

    A backup walks the tree without following symlinks, cuts files into content-defined chunks
    and stores each new chunk once; a second backup given the first's manifest reads only the
    files whose metadata changed. Restores treat the manifest as hostile input.
    """

    def __init__(self, root: str | os.PathLike[str], *, level: int = 3, durable: bool = True) -> None:
        self._native = _native.ChunkStore(os.fspath(root), level, durable)

    @property
    def root(self) -> Path:
        return Path(self._native.root)

    def backup(
        self,
        source: str | os.PathLike[str],
        *,
        previous: str | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> BackupResult:
        """Backs up ``source``; ``previous`` is an earlier manifest of the same tree."""
        return BackupResult(**self._native.backup(os.fspath(source), previous, progress))

    def restore(
        self,
        manifest: str,
        target: str | os.PathLike[str],
        *,
        allow_setid: bool = False,
        progress: Callable[[int], object] | None = None,
    ) -> dict[str, int]:
        """Restores ``manifest`` into an empty directory; on failure leaves it empty."""
        return self._native.restore(manifest, os.fspath(target), allow_setid, progress)

    def verify(self, manifest: str) -> VerifyResult:
        """Re-hashes every chunk of ``manifest``."""
        chunks, nbytes, bad = self._native.verify(manifest)
        return VerifyResult(chunks=chunks, bytes=nbytes, bad=bad)

    def export_tar(
        self,
        manifest: str,
        *,
        fd: int | None = None,
        path: str | os.PathLike[str] | None = None,
        level: int = 3,
    ) -> int:
        """Streams the backup as one tar.zst to ``fd`` or a new file at ``path``."""
        return self._native.export_tar(manifest, fd, None if path is None else os.fspath(path), level)

    def manifest_bytes(self, manifest: str) -> bytes:
        return self._native.manifest_bytes(manifest)

    def put_manifest(self, data: bytes) -> str:
        """Stores a manifest fetched from elsewhere (validated); returns its digest."""
        return self._native.put_manifest(data)

    def chunks(self, manifest: str) -> list[tuple[str, int, int]]:
        """``(digest, length, stored_length)`` of each distinct chunk of ``manifest``."""
        return self._native.chunks(manifest)

    def missing_chunks(self, manifest: str) -> list[tuple[str, int, int]]:
        return self._native.missing_chunks(manifest)

    def chunk_path(self, chunk: str) -> Path:
        return Path(self._native.chunk_path(chunk))

    def add_chunk(self, chunk: str, length: int, data: bytes) -> bool:
        """Adds a fetched chunk's zstd frame after checking it against ``chunk`` and ``length``."""
        return self._native.add_chunk(chunk, length, data)

    def gc(self, keep_manifests: Iterable[str], *, temp_max_age: float = 3600.0) -> tuple[int, int]:
        """Removes what no kept manifest names; ``(chunks_removed, bytes_freed)``."""
        return self._native.gc(list(keep_manifests), temp_max_age)
