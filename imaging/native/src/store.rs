//! The store's on-disk layout, configuration and counters.
//!
//! ```text
//! root/blobs/sha256/<hex>            content-addressed blobs (compressed layers, configs, ...)
//! root/ingest/<random>               partial writes; renamed into blobs/ when verified
//! root/layers/sha256/<diffid>/fs     one unpacked layer (overlayfs lower dir)
//! root/layers/sha256/<diffid>/meta   its size and entry count
//! root/layers/by-blob/<blobhex>      which diff id a compressed blob unpacks to
//! root/layers/sha256/<diffid>/implicit  its directories that had no entry of their own
//! root/layers/.tmp-<random>/         a layer being unpacked (renamed into sha256/ at the end)
//! root/layers/chains/<chainid>/fs    a layer as stacked on a chain whose symlinked directories
//!                                    it writes through (hard links to its inodes; see `chain`)
//! root/layers/chains/<chainid>/meta  the chain's diff ids
//! root/disks/<chainid>.<fs>          a flattened image chain as an erofs or ext4 disk
//! root/disks/.tmp-<random>/          a disk being built
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};

/// What untrusted layers may contain.
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy {
    /// Materialise block/char device nodes and FIFOs (whiteouts are always allowed).
    pub allow_devices: bool,
    /// Keep setuid/setgid bits and `security.capability` xattrs; otherwise they are stripped.
    pub allow_setid: bool,
}

/// Bounds on what one layer may cost.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Uncompressed bytes of one layer's tar stream.
    pub max_layer_bytes: u64,
    /// Tar entries in one layer.
    pub max_entries: u64,
    /// Bytes of one entry name or link target.
    pub max_name_len: usize,
    /// Uncompressed/compressed ratio, enforced once past `RATIO_GRACE_BYTES`.
    pub max_ratio: u64,
}

/// Small layers may compress extremely well (a file of zeros); only large streams are judged.
pub const RATIO_GRACE_BYTES: u64 = 64 << 20;

/// Deepest path accepted in a layer: real images are far shallower, and walking a tree keeps one
/// descriptor per level open.
pub const MAX_DEPTH: usize = 256;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_layer_bytes: 16 << 30,
            max_entries: 2_000_000,
            max_name_len: 4096,
            max_ratio: 500,
        }
    }
}

/// Counters for observing work actually done (e.g. "re-import wrote 0 bytes").
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub blobs_written: AtomicU64,
    pub blobs_deduplicated: AtomicU64,
    pub layers_unpacked: AtomicU64,
    pub layers_skipped: AtomicU64,
    pub disks_built: AtomicU64,
}

impl Stats {
    /// A snapshot as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("bytes_written", g(&self.bytes_written)),
            ("bytes_read", g(&self.bytes_read)),
            ("blobs_written", g(&self.blobs_written)),
            ("blobs_deduplicated", g(&self.blobs_deduplicated)),
            ("layers_unpacked", g(&self.layers_unpacked)),
            ("layers_skipped", g(&self.layers_skipped)),
            ("disks_built", g(&self.disks_built)),
        ]
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A content-addressed layer store rooted at one directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    pub policy: Policy,
    pub limits: Limits,
    pub stats: Stats,
    /// fsync blobs and syncfs unpacked layers before they become visible, so a power loss
    /// cannot leave a truncated file under a valid name. Off only for scratch stores.
    pub durable: bool,
}

impl Store {
    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>, policy: Policy, limits: Limits) -> Result<Self> {
        let root: PathBuf = root.into();
        if limits.max_name_len == 0 || limits.max_entries == 0 || limits.max_ratio == 0 {
            return Err(StoreError::Invalid("limits must be positive".into()));
        }
        for sub in [
            "blobs/sha256",
            "ingest",
            "layers/sha256",
            "layers/by-blob",
            "layers/chains",
            "disks",
        ] {
            let p = root.join(sub);
            fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        Ok(Store {
            root,
            policy,
            limits,
            stats: Stats::default(),
            durable: true,
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it is present).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// The directory of an unpacked layer: `<dir>/fs` is the tree, `<dir>/meta` its summary.
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(diff_id.hex())
    }

    /// Whether a layer has been unpacked.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).join("meta").is_file()
    }

    /// Where the disk of a chain lives.
    pub fn disk_path(&self, chain: &Digest, ext: &str) -> PathBuf {
        self.root
            .join("disks")
            .join(format!("{}.{ext}", chain.hex()))
    }

    pub(crate) fn sub(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// A random, unguessable name for temporary files and directories.
pub fn random_name(prefix: &str) -> String {
    let mut buf = [0u8; 12];
    // getrandom only fails on ancient kernels; fall back to time + pid, still unique enough
    // because every create uses O_EXCL / mkdir semantics.
    if rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        buf[..8].copy_from_slice(&(t as u64).to_le_bytes());
        buf[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    format!("{prefix}{}", hex::encode(buf))
}

/// Renames `from` to `to` unless `to` exists; returns false (and leaves `from`) if it does.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<bool> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::EXIST || e == rustix::io::Errno::NOTEMPTY => Ok(false),
        Err(e) => Err(StoreError::Io {
            context: format!("renaming {} to {}", from.display(), to.display()),
            source: e.into(),
        }),
    }
}

/// fsyncs a directory so a rename into it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = fs::File::open(dir).ctx(|| format!("opening {}", dir.display()))?;
    f.sync_all().ctx(|| format!("syncing {}", dir.display()))
}

/// Removes a file or tree, treating "already gone" as success.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a temporary path when dropped unless disarmed (the "nothing partial left" rule).
pub struct TempGuard {
    path: Option<PathBuf>,
}

impl TempGuard {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        TempGuard { path: Some(path) }
    }

    /// The guarded path.
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("guard already disarmed")
    }

    /// Keeps the path (it was renamed into place).
    pub fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = remove_any(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_layout() {
        let dir = std::env::temp_dir().join(random_name("bulkhead-store-test-"));
        let s = Store::open(&dir, Policy::default(), Limits::default()).unwrap();
        for sub in ["blobs/sha256", "ingest", "layers/sha256", "disks"] {
            assert!(s.root().join(sub).is_dir(), "{sub}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn random_names_differ() {
        assert_ne!(random_name("x"), random_name("x"));
    }
}
