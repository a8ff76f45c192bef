//! The only PyO3 surface: `imaging._native`. Every heavy call releases the GIL.

use std::collections::HashSet;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use crate::backup::restore::RestorePolicy;
use crate::backup::ChunkStore as InnerChunks;
use crate::diff::{changes, IdShift};
use crate::digest::{chain_id as chain_id_of, Digest};
use crate::error::StoreError as Error;
use crate::flatten::DiskFormat;
use crate::gc::KeepSet;
use crate::store::{Limits, Policy, Store as Inner};
use crate::unpack::{Compression, LayerSpec};

create_exception!(
    imaging._native,
    StoreError,
    PyException,
    "Base of all layer-store errors."
);
create_exception!(
    imaging._native,
    DigestMismatch,
    StoreError,
    "Content did not match its digest (.expected, .actual)."
);
create_exception!(
    imaging._native,
    SizeMismatch,
    StoreError,
    "Content was not the promised size (.expected, .actual)."
);
create_exception!(
    imaging._native,
    UnsafeEntry,
    StoreError,
    "An archive entry was refused (.path, .reason)."
);
create_exception!(
    imaging._native,
    LimitExceeded,
    StoreError,
    "A size, count, name-length or ratio limit was exceeded."
);
create_exception!(
    imaging._native,
    NotFound,
    StoreError,
    "A blob or layer is not in the store."
);

/// Sets attributes on a fresh exception instance (which cannot fail in practice) and returns it.
fn with_attrs(py: Python<'_>, err: PyErr, attrs: [(&str, Py<PyAny>); 2]) -> PyErr {
    for (name, value) in attrs {
        let _ = err.value(py).setattr(name, value);
    }
    err
}

/// Turns a store error into the matching Python exception, with its fields as attributes.
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    let set = |err: &PyErr, k: &str, v: Py<PyAny>| {
        // Attribute setting on a fresh exception instance cannot fail in practice.
        let _ = err.value(py).setattr(k, v);
    };
    match e {
        Error::DigestMismatch { expected, actual } => with_attrs(
            py,
            DigestMismatch::new_err(msg),
            [
                (
                    "expected",
                    expected.into_pyobject(py).unwrap().into_any().unbind(),
                ),
                (
                    "actual",
                    actual.into_pyobject(py).unwrap().into_any().unbind(),
                ),
            ],
        ),
        Error::SizeMismatch { expected, actual } => with_attrs(
            py,
            SizeMismatch::new_err(msg),
            [
                (
                    "expected",
                    expected.into_pyobject(py).unwrap().into_any().unbind(),
                ),
                (
                    "actual",
                    actual.into_pyobject(py).unwrap().into_any().unbind(),
                ),
            ],
        ),
        Error::UnsafeEntry { path, reason } => with_attrs(
            py,
            UnsafeEntry::new_err(msg),
            [
                ("path", path.into_pyobject(py).unwrap().into_any().unbind()),
                (
                    "reason",
                    reason.into_pyobject(py).unwrap().into_any().unbind(),
                ),
            ],
        ),
        Error::LimitExceeded(_) => LimitExceeded::new_err(msg),
        Error::NotFound(_) => NotFound::new_err(msg),
        Error::Invalid(_) => PyValueError::new_err(msg),
        Error::Io { source, .. } => {
            let errno = source.raw_os_error();
            let err = StoreError::new_err(msg);
            if let Some(n) = errno {
                set(
                    &err,
                    "errno",
                    n.into_pyobject(py).unwrap().into_any().unbind(),
                );
            }
            err
        }
        Error::Tool { .. } => StoreError::new_err(msg),
    }
}

fn digest(py: Python<'_>, s: &str) -> PyResult<Digest> {
    Digest::parse(s).map_err(|e| to_py(py, e))
}

fn opt_digest(py: Python<'_>, s: Option<&str>) -> PyResult<Option<Digest>> {
    s.map(|s| digest(py, s)).transpose()
}

fn digests(py: Python<'_>, v: &[String]) -> PyResult<Vec<Digest>> {
    v.iter().map(|s| digest(py, s)).collect()
}

/// The outcome of unpacking one layer.
#[pyclass(frozen, get_all, module = "imaging._native")]
#[derive(Clone)]
pub struct LayerResult {
    /// "sha256:<hex>" of the uncompressed tar stream.
    diff_id: String,
    /// Bytes of the uncompressed tar stream.
    size: u64,
    /// Tar entries materialised.
    entries: u64,
    /// setuid/setgid bits and file capabilities removed by policy.
    stripped: u64,
    /// True if the layer was already present (no work done).
    skipped: bool,
    /// Device nodes and FIFOs left out by policy (escaped names).
    skipped_devices: Vec<String>,
}

#[pymethods]
impl LayerResult {
    fn __repr__(&self) -> String {
        format!(
            "LayerResult(diff_id={:?}, size={}, entries={}, stripped={}, skipped={})",
            self.diff_id,
            self.size,
            self.entries,
            self.stripped,
            if self.skipped { "True" } else { "False" }
        )
    }
}

/// A content-addressed layer store rooted at a directory.
#[pyclass(frozen, module = "imaging._native")]
pub struct Store {
    inner: Arc<Inner>,
}

#[pymethods]
impl Store {
    #[new]
    #[pyo3(signature = (root, allow_devices=false, allow_setid=false, max_layer_bytes=None, max_entries=None, max_name_len=4096, max_ratio=None, durable=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        root: PathBuf,
        allow_devices: bool,
        allow_setid: bool,
        max_layer_bytes: Option<u64>,
        max_entries: Option<u64>,
        max_name_len: usize,
        max_ratio: Option<u64>,
        durable: bool,
    ) -> PyResult<Self> {
        let d = Limits::default();
        let limits = Limits {
            max_layer_bytes: max_layer_bytes.unwrap_or(d.max_layer_bytes),
            max_entries: max_entries.unwrap_or(d.max_entries),
            max_name_len,
            max_ratio: max_ratio.unwrap_or(d.max_ratio),
        };
        let policy = Policy {
            allow_devices,
            allow_setid,
        };
        let mut inner = Inner::open(root, policy, limits).map_err(|e| to_py(py, e))?;
        inner.durable = durable;
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// The store's root directory.
    #[getter]
    fn root(&self) -> PathBuf {
        self.inner.root().to_path_buf()
    }

    /// Ingests a file by path; returns (digest, size). With `consume` the file is moved into
    /// the store instead of copied.
    #[pyo3(signature = (path, expected_digest=None, expected_size=None, consume=false))]
    fn ingest_path(
        &self,
        py: Python<'_>,
        path: PathBuf,
        expected_digest: Option<&str>,
        expected_size: Option<u64>,
        consume: bool,
    ) -> PyResult<(String, u64)> {
        let exp = opt_digest(py, expected_digest)?;
        let inner = self.inner.clone();
        py.detach(move || {
            if consume {
                inner.ingest_consume(&path, exp, expected_size)
            } else {
                inner.ingest_path(&path, exp, expected_size)
            }
        })
        .map(|r| (r.digest.to_string(), r.size))
        .map_err(|e| to_py(py, e))
    }

    /// Takes a file whose digest the caller computed while writing every byte of it (moved into
    /// the store without reading it again); returns (digest, size).
    fn ingest_hashed(
        &self,
        py: Python<'_>,
        path: PathBuf,
        digest: &str,
        size: u64,
    ) -> PyResult<(String, u64)> {
        let exp = self::digest(py, digest)?;
        let inner = self.inner.clone();
        py.detach(move || inner.ingest_hashed(&path, exp, size))
            .map(|r| (r.digest.to_string(), r.size))
            .map_err(|e| to_py(py, e))
    }

    /// Queues writeback of what is dirty in an open file (not waiting): a later fsync is short.
    fn start_writeback(&self, py: Python<'_>, fd: i32) -> PyResult<()> {
        if fd < 0 {
            return Err(PyValueError::new_err("negative file descriptor"));
        }
        // SAFETY: the caller keeps the descriptor open for this call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        py.detach(|| crate::ingest::start_writeback_fd(borrowed));
        Ok(())
    }

    /// Ingests from an open file descriptor (read from its current offset; not closed).
    #[pyo3(signature = (fd, expected_digest=None, expected_size=None))]
    fn ingest_fd(
        &self,
        py: Python<'_>,
        fd: i32,
        expected_digest: Option<&str>,
        expected_size: Option<u64>,
    ) -> PyResult<(String, u64)> {
        let exp = opt_digest(py, expected_digest)?;
        if fd < 0 {
            return Err(PyValueError::new_err("negative file descriptor"));
        }
        // SAFETY: the caller passes an open descriptor and keeps it open for this call; we
        // only duplicate it.
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .map_err(|e| {
                to_py(
                    py,
                    Error::Io {
                        context: "dup".into(),
                        source: e,
                    },
                )
            })?;
        let inner = self.inner.clone();
        py.detach(move || inner.ingest_reader(std::fs::File::from(owned), exp, expected_size))
            .map(|r| (r.digest.to_string(), r.size))
            .map_err(|e| to_py(py, e))
    }

    /// Ingests an iterable of bytes-like chunks, releasing the GIL while each is hashed and
    /// written; returns (digest, size).
    #[pyo3(signature = (chunks, expected_digest=None, expected_size=None))]
    fn ingest_iter(
        &self,
        py: Python<'_>,
        chunks: &Bound<'_, PyAny>,
        expected_digest: Option<&str>,
        expected_size: Option<u64>,
    ) -> PyResult<(String, u64)> {
        let exp = opt_digest(py, expected_digest)?;
        let mut w = self
            .inner
            .begin_ingest(exp, expected_size)
            .map_err(|e| to_py(py, e))?;
        for chunk in chunks.try_iter()? {
            let data: PyBackedBytes = chunk?.extract()?;
            py.detach(|| w.write_chunk(&data))
                .map_err(|e| to_py(py, e))?;
        }
        py.detach(move || w.commit())
            .map(|r| (r.digest.to_string(), r.size))
            .map_err(|e| to_py(py, e))
    }

    /// Whether the blob is present.
    fn has_blob(&self, py: Python<'_>, digest_str: &str) -> PyResult<bool> {
        Ok(self.inner.has_blob(&digest(py, digest_str)?))
    }

    /// Path of a blob (present or not).
    fn blob_path(&self, py: Python<'_>, digest_str: &str) -> PyResult<PathBuf> {
        Ok(self.inner.blob_path(&digest(py, digest_str)?))
    }

    /// Whether a layer (by diff id) is unpacked.
    fn has_layer(&self, py: Python<'_>, diff_id: &str) -> PyResult<bool> {
        Ok(self.inner.has_layer(&digest(py, diff_id)?))
    }

    /// Path of an unpacked layer's tree (`layers/sha256/<hex>/fs`).
    fn layer_path(&self, py: Python<'_>, diff_id: &str) -> PyResult<PathBuf> {
        Ok(self.inner.layer_dir(&digest(py, diff_id)?).join("fs"))
    }

    /// Counters of work done by this Store object.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.stats.snapshot() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Unpacks layers given as (blob_digest, media_type, expected_diff_id or None), in parallel.
    fn unpack_layers(
        &self,
        py: Python<'_>,
        layers: Vec<(String, String, Option<String>)>,
    ) -> PyResult<Vec<LayerResult>> {
        let specs = layers
            .iter()
            .map(|(b, m, e)| {
                Ok(LayerSpec {
                    blob: digest(py, b)?,
                    media_type: m.clone(),
                    expected_diff_id: opt_digest(py, e.as_deref())?,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let inner = self.inner.clone();
        let results = py
            .detach(move || inner.unpack_layers(&specs))
            .map_err(|e| to_py(py, e))?;
        Ok(results
            .into_iter()
            .map(|r| LayerResult {
                diff_id: r.diff_id.to_string(),
                size: r.size,
                entries: r.entries,
                stripped: r.stripped,
                skipped: r.skipped,
                skipped_devices: r.skipped_devices,
            })
            .collect())
    }

    /// The dirs to stack for a chain of diff ids (bottom first): each layer's tree, or this
    /// chain's variant of it where it writes through a lower layer's symlinked directory.
    fn chain_dirs(&self, py: Python<'_>, diff_ids: Vec<String>) -> PyResult<Vec<PathBuf>> {
        let ids = digests(py, &diff_ids)?;
        let inner = self.inner.clone();
        py.detach(move || inner.chain_dirs(&ids))
            .map_err(|e| to_py(py, e))
    }

    /// Builds (or finds) the disk for a chain of diff ids (bottom first); returns its path.
    #[pyo3(signature = (diff_ids, fs="erofs"))]
    fn build_disk(&self, py: Python<'_>, diff_ids: Vec<String>, fs: &str) -> PyResult<PathBuf> {
        let ids = digests(py, &diff_ids)?;
        let format = DiskFormat::parse(fs).map_err(|e| to_py(py, e))?;
        let inner = self.inner.clone();
        py.detach(move || inner.build_disk(&ids, format))
            .map_err(|e| to_py(py, e))
    }

    /// Commits an overlayfs upper dir as a compressed layer; returns (blob_digest, diff_id, size).
    /// `id_shift=(host_base, size)`: the upper dir of a user-namespaced container holds host ids.
    #[pyo3(signature = (upper_dir, compression="gzip", id_shift=None))]
    fn diff_upper(
        &self,
        py: Python<'_>,
        upper_dir: PathBuf,
        compression: &str,
        id_shift: Option<(u32, u32)>,
    ) -> PyResult<(String, String, u64)> {
        let c = match compression {
            "gzip" => Compression::Gzip,
            "zstd" => Compression::Zstd,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown compression {other:?}"
                )))
            }
        };
        let inner = self.inner.clone();
        let shift = id_shift.map(|(host_base, size)| IdShift { host_base, size });
        py.detach(move || inner.diff_upper(&upper_dir, c, shift))
            .map(|c| {
                (
                    c.blob.digest.to_string(),
                    c.diff_id.to_string(),
                    c.blob.size,
                )
            })
            .map_err(|e| to_py(py, e))
    }

    /// Lists ("A"|"C"|"D", "/path") changes of an upper dir against lower dirs (bottom first).
    #[pyo3(signature = (upper_dir, lower_dirs=Vec::new()))]
    fn changes(
        &self,
        py: Python<'_>,
        upper_dir: PathBuf,
        lower_dirs: Vec<PathBuf>,
    ) -> PyResult<Vec<(String, String)>> {
        py.detach(move || changes(&upper_dir, &lower_dirs))
            .map(|v| {
                v.into_iter()
                    .map(|(k, p)| (k.letter().to_string(), p))
                    .collect()
            })
            .map_err(|e| to_py(py, e))
    }

    /// Removes blobs, layers and disks not named, and temporaries older than `temp_max_age`
    /// seconds. Returns counts and freed bytes.
    #[pyo3(signature = (keep_blobs, keep_layers, keep_disks, temp_max_age=3600.0))]
    fn gc<'py>(
        &self,
        py: Python<'py>,
        keep_blobs: Vec<String>,
        keep_layers: Vec<String>,
        keep_disks: Vec<String>,
        temp_max_age: f64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let set = |v: &[String]| -> PyResult<HashSet<Digest>> {
            Ok(digests(py, v)?.into_iter().collect())
        };
        let keep = KeepSet {
            blobs: set(&keep_blobs)?,
            layers: set(&keep_layers)?,
            disks: set(&keep_disks)?,
        };
        let age = Duration::try_from_secs_f64(temp_max_age)
            .map_err(|_| PyValueError::new_err("temp_max_age must be a non-negative number"))?;
        let inner = self.inner.clone();
        let r = py
            .detach(move || inner.gc(&keep, age))
            .map_err(|e| to_py(py, e))?;
        let d = PyDict::new(py);
        d.set_item("removed_blobs", r.removed_blobs)?;
        d.set_item("removed_layers", r.removed_layers)?;
        d.set_item("removed_disks", r.removed_disks)?;
        d.set_item("removed_temps", r.removed_temps)?;
        d.set_item("freed_bytes", r.freed_bytes)?;
        Ok(d)
    }
}

/// Calls a Python progress callback with the bytes done, at most once per `PROGRESS_EVERY`.
struct Throttled {
    cb: Option<Py<PyAny>>,
    last: std::sync::atomic::AtomicU64,
}

const PROGRESS_EVERY: u64 = 64 << 20;

impl Throttled {
    fn new(cb: Option<Py<PyAny>>) -> Self {
        Throttled {
            cb,
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn report(&self, done: u64) {
        use std::sync::atomic::Ordering;
        let Some(cb) = &self.cb else { return };
        let last = self.last.load(Ordering::Relaxed);
        if done < last + PROGRESS_EVERY
            || self
                .last
                .compare_exchange(last, done, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // A failing callback must not fail the backup: progress is advisory.
        Python::attach(|py| {
            let _ = cb.call1(py, (done,));
        });
    }
}

fn stats_dict<'py>(py: Python<'py>, pairs: &[(&str, u64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in pairs {
        d.set_item(*k, *v)?;
    }
    Ok(d)
}

/// (chunks checked, bytes, [(digest, reason)]).
type VerifyTuple = (u64, u64, Vec<(String, String)>);

/// A deduplicating chunk store for backups (content-defined chunks, zstd, sha256 names).
#[pyclass(frozen, module = "imaging._native")]
pub struct ChunkStore {
    inner: Arc<InnerChunks>,
}

#[pymethods]
impl ChunkStore {
    #[new]
    #[pyo3(signature = (root, level=3, durable=true))]
    fn new(py: Python<'_>, root: PathBuf, level: i32, durable: bool) -> PyResult<Self> {
        let mut inner = InnerChunks::open(root).map_err(|e| to_py(py, e))?;
        if !(1..=19).contains(&level) {
            return Err(PyValueError::new_err("level must be between 1 and 19"));
        }
        inner.level = level;
        inner.durable = durable;
        Ok(ChunkStore {
            inner: Arc::new(inner),
        })
    }

    /// The store's root directory.
    #[getter]
    fn root(&self) -> PathBuf {
        self.inner.root().to_path_buf()
    }

    /// Backs up a directory; with `previous` (a manifest digest) unchanged files are not read.
    /// Returns the manifest digest and counters.
    #[pyo3(signature = (source, previous=None, progress=None))]
    fn backup<'py>(
        &self,
        py: Python<'py>,
        source: PathBuf,
        previous: Option<&str>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let prev = opt_digest(py, previous)?;
        let inner = self.inner.clone();
        let t = Throttled::new(progress);
        let s = py
            .detach(move || {
                let report = |n: u64| t.report(n);
                inner.backup(&source, prev.as_ref(), Some(&report))
            })
            .map_err(|e| to_py(py, e))?;
        let d = stats_dict(
            py,
            &[
                ("entries", s.entries),
                ("files", s.files),
                ("source_bytes", s.source_bytes),
                ("bytes_read", s.bytes_read),
                ("files_unchanged", s.files_unchanged),
                ("chunks", s.chunks),
                ("new_chunks", s.new_chunks),
                ("new_chunk_bytes", s.new_chunk_bytes),
                ("new_raw_bytes", s.new_raw_bytes),
                ("reused_chunks", s.reused_chunks),
                ("distinct_chunks", s.distinct_chunks),
                ("stored_bytes", s.stored_bytes),
            ],
        )?;
        d.set_item("manifest", s.manifest)?;
        d.set_item("skipped", s.skipped)?;
        Ok(d)
    }

    /// The JSON bytes of a stored manifest (checked against its digest).
    fn manifest_bytes<'py>(
        &self,
        py: Python<'py>,
        manifest: &str,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let d = digest(py, manifest)?;
        let b = self.inner.manifest_bytes(&d).map_err(|e| to_py(py, e))?;
        Ok(pyo3::types::PyBytes::new(py, &b))
    }

    /// Stores manifest bytes fetched from elsewhere (validated as hostile input); returns the digest.
    fn put_manifest(&self, py: Python<'_>, data: &[u8]) -> PyResult<String> {
        let inner = self.inner.clone();
        let data = data.to_vec();
        py.detach(move || inner.put_manifest_bytes(&data))
            .map(|d| d.to_string())
            .map_err(|e| to_py(py, e))
    }

    /// Each distinct chunk of a manifest: (digest, length, stored length).
    fn chunks(&self, py: Python<'_>, manifest: &str) -> PyResult<Vec<(String, u64, u64)>> {
        let d = digest(py, manifest)?;
        let m = self.inner.manifest(&d).map_err(|e| to_py(py, e))?;
        Ok(m.distinct_chunks()
            .into_iter()
            .map(|(d, n, s)| (d.to_string(), n, s))
            .collect())
    }

    /// The chunks of a manifest that this store lacks: (digest, length, stored length).
    fn missing_chunks(&self, py: Python<'_>, manifest: &str) -> PyResult<Vec<(String, u64, u64)>> {
        let d = digest(py, manifest)?;
        let inner = self.inner.clone();
        py.detach(move || {
            let m = inner.manifest(&d)?;
            Ok(inner.missing_chunks(&m))
        })
        .map(|v: Vec<_>| {
            v.into_iter()
                .map(|(d, n, s)| (d.to_string(), n, s))
                .collect()
        })
        .map_err(|e| to_py(py, e))
    }

    /// Path of a chunk's stored (zstd) file, present or not.
    fn chunk_path(&self, py: Python<'_>, chunk: &str) -> PyResult<PathBuf> {
        Ok(self.inner.chunk_path(&digest(py, chunk)?))
    }

    /// Adds a chunk's stored (zstd) bytes fetched from elsewhere, after checking that they
    /// inflate to `length` bytes with that digest. False if it was already present.
    fn add_chunk(&self, py: Python<'_>, chunk: &str, length: u64, data: &[u8]) -> PyResult<bool> {
        let d = digest(py, chunk)?;
        let inner = self.inner.clone();
        let data = data.to_vec();
        py.detach(move || inner.add_stored_chunk(&d, length, &data))
            .map_err(|e| to_py(py, e))
    }

    /// Restores a manifest into an empty directory; returns counters. Setid bits are dropped
    /// unless `allow_setid`.
    #[pyo3(signature = (manifest, target, allow_setid=false, progress=None))]
    fn restore<'py>(
        &self,
        py: Python<'py>,
        manifest: &str,
        target: PathBuf,
        allow_setid: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = digest(py, manifest)?;
        let inner = self.inner.clone();
        let t = Throttled::new(progress);
        let s = py
            .detach(move || {
                let m = inner.manifest(&d)?;
                let report = |n: u64| t.report(n);
                inner.restore(&m, &target, RestorePolicy { allow_setid }, Some(&report))
            })
            .map_err(|e| to_py(py, e))?;
        stats_dict(
            py,
            &[
                ("entries", s.entries),
                ("files", s.files),
                ("bytes", s.bytes),
            ],
        )
    }

    /// Re-hashes every chunk of a manifest; returns (chunks checked, bytes, [(digest, reason)]).
    fn verify(&self, py: Python<'_>, manifest: &str) -> PyResult<VerifyTuple> {
        let d = digest(py, manifest)?;
        let inner = self.inner.clone();
        py.detach(move || {
            let m = inner.manifest(&d)?;
            Ok(inner.verify(&m))
        })
        .map(|r| {
            (
                r.chunks,
                r.bytes,
                r.bad.into_iter().map(|b| (b.digest, b.reason)).collect(),
            )
        })
        .map_err(|e| to_py(py, e))
    }

    /// Writes a manifest as one tar.zst stream to an open descriptor (not closed) or a new file;
    /// returns the bytes written.
    #[pyo3(signature = (manifest, fd=None, path=None, level=3))]
    fn export_tar(
        &self,
        py: Python<'_>,
        manifest: &str,
        fd: Option<i32>,
        path: Option<PathBuf>,
        level: i32,
    ) -> PyResult<u64> {
        let d = digest(py, manifest)?;
        let out: std::fs::File = match (fd, path) {
            (Some(fd), None) if fd >= 0 => {
                // SAFETY: the caller keeps the descriptor open for this call; we duplicate it.
                let owned = unsafe { BorrowedFd::borrow_raw(fd) }
                    .try_clone_to_owned()
                    .map_err(|e| {
                        to_py(
                            py,
                            Error::Io {
                                context: "dup".into(),
                                source: e,
                            },
                        )
                    })?;
                std::fs::File::from(owned)
            }
            (None, Some(p)) => std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| {
                    to_py(
                        py,
                        Error::Io {
                            context: format!("creating {}", p.display()),
                            source: e,
                        },
                    )
                })?,
            _ => return Err(PyValueError::new_err("give exactly one of fd and path")),
        };
        let inner = self.inner.clone();
        py.detach(move || {
            let m = inner.manifest(&d)?;
            inner.export_tar(&m, std::io::BufWriter::with_capacity(1 << 20, out), level)
        })
        .map_err(|e| to_py(py, e))
    }

    /// Removes chunks and manifests that no kept manifest names, and temporaries older than
    /// `temp_max_age` seconds; returns (chunks removed, bytes freed).
    #[pyo3(signature = (keep_manifests, temp_max_age=3600.0))]
    fn gc(
        &self,
        py: Python<'_>,
        keep_manifests: Vec<String>,
        temp_max_age: f64,
    ) -> PyResult<(u64, u64)> {
        let keep = digests(py, &keep_manifests)?;
        let age = Duration::try_from_secs_f64(temp_max_age)
            .map_err(|_| PyValueError::new_err("temp_max_age must be a non-negative number"))?;
        let inner = self.inner.clone();
        py.detach(move || inner.gc(&keep, age))
            .map_err(|e| to_py(py, e))
    }
}

/// The OCI chain id of diff ids (bottom first).
#[pyfunction]
fn chain_id(py: Python<'_>, diff_ids: Vec<String>) -> PyResult<String> {
    let ids = digests(py, &diff_ids)?;
    chain_id_of(&ids)
        .map(|d| d.to_string())
        .map_err(|e| to_py(py, e))
}

/// The Python module `imaging._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Store>()?;
    m.add_class::<LayerResult>()?;
    m.add_class::<ChunkStore>()?;
    m.add_function(wrap_pyfunction!(chain_id, m)?)?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("DigestMismatch", py.get_type::<DigestMismatch>())?;
    m.add("SizeMismatch", py.get_type::<SizeMismatch>())?;
    m.add("UnsafeEntry", py.get_type::<UnsafeEntry>())?;
    m.add("LimitExceeded", py.get_type::<LimitExceeded>())?;
    m.add("NotFound", py.get_type::<NotFound>())?;
    Ok(())
}
