//! The chunk store: zstd-compressed chunks named by the sha256 of their uncompressed bytes, and
//! manifests named by the sha256 of their JSON.
//!
//! Durability (the layer store's rule: nothing truncated may ever sit under a valid name): new
//! chunks are written to `tmp/`, and a `ChunkBatch` publishes them in groups: one `syncfs` makes
//! the temporaries durable, then each is renamed into place, then a second `syncfs` makes the
//! renames durable. A manifest is written only after its chunks are published, so a crash at any
//! point leaves at worst unreferenced temporaries (removed by `gc`).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use super::manifest::{Manifest, RestoreLimits};
use super::MAX_CHUNK_ACCEPTED;
use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::store::{random_name, rename_noreplace, sync_dir};

/// Publish pending chunks once this many compressed bytes are waiting.
const BATCH_BYTES: u64 = 256 << 20;
/// ... or this many chunks.
const BATCH_CHUNKS: usize = 8192;

/// A chunk store rooted at one directory.
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    /// zstd level for new chunks.
    pub level: i32,
    /// `syncfs` before chunks and manifests become visible. Off only for scratch stores.
    pub durable: bool,
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Compresses with a per-thread context (creating one per chunk costs more than small chunks).
fn compress(data: &[u8], level: i32) -> Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((l, _)) if *l == level) {
            let c = zstd::bulk::Compressor::new(level).ctx(|| "zstd compressor".into())?;
            *slot = Some((level, c));
        }
        let (_, c) = slot.as_mut().expect("just set");
        c.compress(data).ctx(|| "compressing a chunk".into())
    })
}

/// Decompresses at most `len` bytes; a frame that inflates to anything else is corrupt.
fn decompress(data: &[u8], len: u64) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        let d = slot.as_mut().expect("just set");
        let out = d.decompress(data, len as usize)?;
        if out.len() as u64 != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "chunk has the wrong length",
            ));
        }
        Ok(out)
    })
}

/// Why a chunk failed verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadChunk {
    pub digest: String,
    pub reason: String,
}

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub chunks: u64,
    pub bytes: u64,
    pub bad: Vec<BadChunk>,
}

impl ChunkStore {
    /// Opens (creating if needed) a chunk store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root: PathBuf = root.into();
        for sub in ["manifests", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        let chunks = root.join("chunks");
        if !chunks.join("ff").is_dir() {
            for i in 0..=255u8 {
                let p = chunks.join(format!("{i:02x}"));
                fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
            }
        }
        Ok(ChunkStore {
            root,
            level: 3,
            durable: true,
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a chunk lives (present or not).
    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Where a manifest lives (present or not).
    pub fn manifest_path(&self, d: &Digest) -> PathBuf {
        self.root.join("manifests").join(d.hex())
    }

    /// The stored (compressed) size of a chunk, if present.
    pub fn stored_size(&self, d: &Digest) -> Option<u64> {
        fs::symlink_metadata(self.chunk_path(d))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Reads a chunk, decompresses it and checks its length and digest.
    pub fn read_chunk(&self, d: &Digest, len: u64) -> Result<Vec<u8>> {
        if len > MAX_CHUNK_ACCEPTED {
            return Err(StoreError::LimitExceeded(format!(
                "chunk {d} of {len} bytes"
            )));
        }
        let path = self.chunk_path(d);
        let stored = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("chunk {d}")))
            }
            Err(e) => return Err(e).ctx(|| format!("reading {}", path.display())),
        };
        let data = decompress(&stored, len).map_err(|_| StoreError::DigestMismatch {
            expected: d.to_string(),
            actual: "(undecodable chunk)".into(),
        })?;
        let actual = Digest::of(&data);
        if &actual != d {
            return Err(StoreError::DigestMismatch {
                expected: d.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(data)
    }

    /// Adds a chunk fetched from elsewhere (its zstd frame): checks that it inflates to `len`
    /// bytes hashing to `d` before it gets the name. Returns false if it was already present.
    pub fn add_stored_chunk(&self, d: &Digest, len: u64, stored: &[u8]) -> Result<bool> {
        if self.stored_size(d).is_some() {
            return Ok(false);
        }
        if len > MAX_CHUNK_ACCEPTED {
            return Err(StoreError::LimitExceeded(format!(
                "chunk {d} of {len} bytes"
            )));
        }
        let data = decompress(stored, len).map_err(|_| StoreError::DigestMismatch {
            expected: d.to_string(),
            actual: "(undecodable chunk)".into(),
        })?;
        let actual = Digest::of(&data);
        if &actual != d {
            return Err(StoreError::DigestMismatch {
                expected: d.to_string(),
                actual: actual.to_string(),
            });
        }
        let tmp = self.write_temp(stored)?;
        if self.durable {
            let f = File::open(&tmp).ctx(|| "reopening a chunk".into())?;
            f.sync_all().ctx(|| "syncing a chunk".into())?;
        }
        let dest = self.chunk_path(d);
        if !rename_noreplace(&tmp, &dest)? {
            let _ = fs::remove_file(&tmp);
            return Ok(false);
        }
        if self.durable {
            sync_dir(dest.parent().expect("chunk has a parent"))?;
        }
        Ok(true)
    }

    fn write_temp(&self, bytes: &[u8]) -> Result<PathBuf> {
        let tmp = self.root.join("tmp").join(random_name("c-"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx(|| format!("creating {}", tmp.display()))?;
        if let Err(e) = f.write_all(bytes) {
            let _ = fs::remove_file(&tmp);
            return Err(e).ctx(|| format!("writing {}", tmp.display()));
        }
        Ok(tmp)
    }

    /// Stores a manifest (after its chunks are published); returns its digest.
    pub fn put_manifest(&self, m: &Manifest) -> Result<Digest> {
        let json = m.to_json()?;
        self.put_manifest_bytes(&json)
    }

    /// Stores manifest bytes as they are (fetched from the portal, say) after validating them.
    pub fn put_manifest_bytes(&self, json: &[u8]) -> Result<Digest> {
        Manifest::parse(json, RestoreLimits::default())?;
        let d = Digest::of(json);
        let dest = self.manifest_path(&d);
        if dest.is_file() {
            return Ok(d);
        }
        let tmp = self.write_temp(json)?;
        if self.durable {
            let f = File::open(&tmp).ctx(|| "reopening a manifest".into())?;
            f.sync_all().ctx(|| "syncing a manifest".into())?;
        }
        if !rename_noreplace(&tmp, &dest)? {
            let _ = fs::remove_file(&tmp);
        } else if self.durable {
            sync_dir(&self.root.join("manifests"))?;
        }
        Ok(d)
    }

    /// Loads and validates a stored manifest.
    pub fn manifest(&self, d: &Digest) -> Result<Manifest> {
        Manifest::parse(&self.manifest_bytes(d)?, RestoreLimits::default())
    }

    /// The JSON bytes of a stored manifest, checked against its name.
    pub fn manifest_bytes(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.manifest_path(d);
        let mut json = Vec::new();
        match File::open(&path) {
            Ok(f) => f
                .take(1 << 32)
                .read_to_end(&mut json)
                .ctx(|| format!("reading {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("manifest {d}")))
            }
            Err(e) => return Err(e).ctx(|| format!("reading {}", path.display())),
        };
        let actual = Digest::of(&json);
        if &actual != d {
            return Err(StoreError::DigestMismatch {
                expected: d.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(json)
    }

    /// The chunks of a manifest that are not in this store (to fetch before a restore).
    pub fn missing_chunks(&self, m: &Manifest) -> Vec<(Digest, u64, u64)> {
        m.distinct_chunks()
            .into_par_iter()
            .filter(|(d, _, _)| self.stored_size(d).is_none())
            .collect()
    }

    /// Re-hashes every chunk a manifest names (in parallel); reports missing and bad ones.
    pub fn verify(&self, m: &Manifest) -> VerifyReport {
        let chunks = m.distinct_chunks();
        let bytes = AtomicU64::new(0);
        let mut bad: Vec<BadChunk> = chunks
            .par_iter()
            .filter_map(|(d, len, _)| match self.read_chunk(d, *len) {
                Ok(_) => {
                    bytes.fetch_add(*len, Ordering::Relaxed);
                    None
                }
                Err(e) => Some(BadChunk {
                    digest: d.to_string(),
                    reason: match e {
                        StoreError::NotFound(_) => "missing".into(),
                        StoreError::DigestMismatch { .. } => "content does not match".into(),
                        other => other.to_string(),
                    },
                }),
            })
            .collect();
        bad.sort_by(|a, b| a.digest.cmp(&b.digest));
        VerifyReport {
            chunks: chunks.len() as u64,
            bytes: bytes.into_inner(),
            bad,
        }
    }

    /// Removes chunks no kept manifest names, manifests not kept, and temporaries older than
    /// `temp_max_age`. Returns (chunks removed, bytes freed).
    pub fn gc(&self, keep: &[Digest], temp_max_age: Duration) -> Result<(u64, u64)> {
        let mut live: HashSet<String> = HashSet::new();
        let kept: HashSet<&str> = keep.iter().map(|d| d.hex()).collect();
        for d in keep {
            for (c, _, _) in self.manifest(d)?.distinct_chunks() {
                live.insert(c.hex().to_string());
            }
        }
        let mut removed = 0;
        let mut freed = 0;
        for i in 0..=255u8 {
            let dir = self.root.join("chunks").join(format!("{i:02x}"));
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for ent in rd.flatten() {
                let name = ent.file_name();
                let name = name.to_string_lossy();
                if !live.contains(name.as_ref()) {
                    let len = ent.metadata().map(|m| m.len()).unwrap_or(0);
                    if fs::remove_file(ent.path()).is_ok() {
                        removed += 1;
                        freed += len;
                    }
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.root.join("manifests")) {
            for ent in rd.flatten() {
                if !kept.contains(ent.file_name().to_string_lossy().as_ref()) {
                    let _ = fs::remove_file(ent.path());
                }
            }
        }
        let now = SystemTime::now();
        if let Ok(rd) = fs::read_dir(self.root.join("tmp")) {
            for ent in rd.flatten() {
                let old = ent
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default() >= temp_max_age)
                    .unwrap_or(false);
                if old {
                    let _ = fs::remove_file(ent.path());
                }
            }
        }
        Ok((removed, freed))
    }
}

/// What storing one chunk did.
#[derive(Clone, Copy, Debug)]
pub struct Put {
    pub stored_len: u64,
    pub new: bool,
}

/// New chunks of one backup, published in durable groups (see the module comment).
pub struct ChunkBatch<'s> {
    store: &'s ChunkStore,
    state: Mutex<BatchState>,
    pub new_chunks: AtomicU64,
    pub new_stored_bytes: AtomicU64,
    pub new_raw_bytes: AtomicU64,
    pub reused_chunks: AtomicU64,
    pub reused_raw_bytes: AtomicU64,
}

#[derive(Default)]
struct BatchState {
    /// Written to tmp/, not yet renamed: digest -> (temp path, stored length).
    pending: HashMap<Digest, (PathBuf, u64)>,
    pending_bytes: u64,
}

impl<'s> ChunkBatch<'s> {
    /// Starts a batch on `store`.
    pub fn new(store: &'s ChunkStore) -> Self {
        ChunkBatch {
            store,
            state: Mutex::new(BatchState::default()),
            new_chunks: AtomicU64::new(0),
            new_stored_bytes: AtomicU64::new(0),
            new_raw_bytes: AtomicU64::new(0),
            reused_chunks: AtomicU64::new(0),
            reused_raw_bytes: AtomicU64::new(0),
        }
    }

    pub(crate) fn store_ref(&self) -> &'s ChunkStore {
        self.store
    }

    fn known(&self, d: &Digest) -> Option<u64> {
        if let Some((_, n)) = self.state.lock().expect("batch lock").pending.get(d) {
            return Some(*n);
        }
        self.store.stored_size(d)
    }

    /// Stores one chunk unless present; safe to call from many threads.
    pub fn put(&self, data: &[u8]) -> Result<(Digest, Put)> {
        let d = Digest::from_hasher(Sha256::new_with_prefix(data));
        if let Some(n) = self.known(&d) {
            self.reused_chunks.fetch_add(1, Ordering::Relaxed);
            self.reused_raw_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return Ok((
                d,
                Put {
                    stored_len: n,
                    new: false,
                },
            ));
        }
        let packed = compress(data, self.store.level)?;
        let tmp = self.store.write_temp(&packed)?;
        let n = packed.len() as u64;
        let flush = {
            let mut st = self.state.lock().expect("batch lock");
            if st.pending.contains_key(&d) {
                // Another thread stored the same content meanwhile.
                drop(st);
                let _ = fs::remove_file(&tmp);
                self.reused_chunks.fetch_add(1, Ordering::Relaxed);
                self.reused_raw_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                return Ok((
                    d,
                    Put {
                        stored_len: n,
                        new: false,
                    },
                ));
            }
            st.pending.insert(d.clone(), (tmp, n));
            st.pending_bytes += n;
            st.pending_bytes >= BATCH_BYTES || st.pending.len() >= BATCH_CHUNKS
        };
        self.new_chunks.fetch_add(1, Ordering::Relaxed);
        self.new_stored_bytes.fetch_add(n, Ordering::Relaxed);
        self.new_raw_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if flush {
            self.publish()?;
        }
        Ok((
            d,
            Put {
                stored_len: n,
                new: true,
            },
        ))
    }

    /// Makes every pending chunk durable and visible.
    pub fn publish(&self) -> Result<()> {
        let pending = {
            let mut st = self.state.lock().expect("batch lock");
            st.pending_bytes = 0;
            std::mem::take(&mut st.pending)
        };
        if pending.is_empty() {
            return Ok(());
        }
        let sync = || -> Result<()> {
            if self.store.durable {
                let f = File::open(&self.store.root).ctx(|| "opening the chunk store".into())?;
                rustix::fs::syncfs(&f).ctx(|| "syncing the chunk store".into())?;
            }
            Ok(())
        };
        sync()?;
        for (d, (tmp, _)) in &pending {
            if !rename_noreplace(tmp, &self.store.chunk_path(d))? {
                let _ = fs::remove_file(tmp);
            }
        }
        sync()
    }

    /// Removes pending temporaries (the backup failed).
    pub fn abandon(&self) {
        let pending = std::mem::take(&mut self.state.lock().expect("batch lock").pending);
        for (_, (tmp, _)) in pending {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn scratch(tag: &str) -> (ChunkStore, PathBuf) {
        let dir = std::env::temp_dir().join(random_name(&format!("bulkhead-{tag}-")));
        let mut s = ChunkStore::open(&dir).unwrap();
        s.durable = false;
        (s, dir)
    }

    #[test]
    fn a_chunk_is_stored_once_and_reads_back_verified() {
        let (s, dir) = scratch("chunks");
        let b = ChunkBatch::new(&s);
        let (d1, p1) = b.put(b"hello hello hello").unwrap();
        let (d2, p2) = b.put(b"hello hello hello").unwrap();
        assert_eq!(d1, d2);
        assert!(p1.new && !p2.new);
        b.publish().unwrap();
        assert_eq!(s.read_chunk(&d1, 17).unwrap(), b"hello hello hello");
        assert_eq!(b.new_chunks.load(Ordering::Relaxed), 1);
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        // A corrupted chunk is caught on read.
        fs::write(
            s.chunk_path(&d1),
            zstd::bulk::compress(b"hellO hello hello", 1).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            s.read_chunk(&d1, 17),
            Err(StoreError::DigestMismatch { .. })
        ));
        // A lie about the length is caught too (and bounded).
        assert!(s.read_chunk(&d1, 4).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_fetched_chunk_must_match_its_digest() {
        let (s, dir) = scratch("chunks");
        let good = Digest::of(b"data");
        let wrong = zstd::bulk::compress(b"date", 1).unwrap();
        assert!(matches!(
            s.add_stored_chunk(&good, 4, &wrong),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(s.stored_size(&good).is_none());
        let right = zstd::bulk::compress(b"data", 1).unwrap();
        assert!(s.add_stored_chunk(&good, 4, &right).unwrap());
        assert!(!s.add_stored_chunk(&good, 4, &right).unwrap());
        assert_eq!(s.read_chunk(&good, 4).unwrap(), b"data");
        fs::remove_dir_all(dir).unwrap();
    }
}
