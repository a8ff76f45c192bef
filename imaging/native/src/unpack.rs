//! Unpacking untrusted layer blobs into `layers/sha256/<diffid>/fs` in overlayfs form.
//!
//! One streaming pass: file -> decompressor -> ratio/size guard -> SHA-256 (the DiffID) -> tar
//! parser -> entries applied through `safepath::Root`, which never follows a symlink. Tar is parsed
//! in raw mode so that long-name and PAX records are read with our own size caps and
//! interpreted by us (no parser differential between what is checked and what is written).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rustix::fs::{
    chownat, fchmod, fchown, fsetxattr, fstat, futimens, linkat, makedev, mkdirat, mknodat, openat,
    statat, symlinkat, unlinkat, utimensat, AtFlags, FileType, Gid, Mode, OFlags, Timespec,
    Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use crate::ahead::read_ahead;
use crate::digest::{CountingReader, Digest, HashingReader};
use crate::error::{IoContext, Result, StoreError};
use crate::safepath::{split_name, NameError, ResolveError, Root};
use crate::store::{random_name, rename_noreplace, Stats, Store, TempGuard, RATIO_GRACE_BYTES};

/// One layer to unpack.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    /// The (compressed) blob in the store.
    pub blob: Digest,
    /// Its OCI/Docker media type ("" to detect from magic bytes).
    pub media_type: String,
    /// The DiffID the image config promises, if known.
    pub expected_diff_id: Option<Digest>,
}

/// What unpacking one layer produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerResult {
    /// SHA-256 of the uncompressed tar stream.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar stream.
    pub size: u64,
    /// Tar entries materialised (whiteouts included).
    pub entries: u64,
    /// setuid/setgid bits and file capabilities removed by policy.
    pub stripped: u64,
    /// True if the layer was already unpacked and no work was done.
    pub skipped: bool,
    /// Device nodes and FIFOs left out by policy (the runtimes supply `/dev`), shown escaped;
    /// at most `MAX_LISTED_DEVICES` are named.
    pub skipped_devices: Vec<String>,
}

/// Skipped device nodes named in a layer's result (a debootstrap tree has about ten).
pub const MAX_LISTED_DEVICES: usize = 64;

/// A layer extracted into a temporary dir, waiting to be synced and renamed into place.
enum Staged {
    Present(LayerResult),
    Fresh {
        guard: TempGuard,
        result: LayerResult,
        blob: Digest,
    },
}

/// Compression of a layer blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Picks the decompressor: magic bytes win over the media type (mislabelled layers are common),
/// but unknown media types are refused.
pub fn detect_compression(media_type: &str, magic: &[u8]) -> Result<Compression> {
    const KNOWN: &[&str] = &[
        "",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ];
    if !KNOWN.contains(&media_type) {
        return Err(StoreError::Invalid(format!(
            "unsupported layer media type {media_type:?}"
        )));
    }
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

impl Store {
    /// Unpacks layers (independent ones in parallel); each is unpacked at most once.
    ///
    /// Layers are extracted into temporary dirs in parallel, made durable with one `syncfs` for
    /// the whole batch, then renamed into place. A layer that fails leaves nothing; the others
    /// still land (they are valid and will be wanted again).
    ///
    /// One worker per core takes the layers largest first (so a big layer does not start last
    /// and run alone), and each layer decompresses on a helper thread (see `ahead`). In a
    /// durable store a [`Flusher`] starts writeback of what is already extracted while the
    /// rest is still being unpacked, so the final `syncfs` mostly waits for I/O in flight.
    pub fn unpack_layers(&self, specs: &[LayerSpec]) -> Result<Vec<LayerResult>> {
        let flusher = if self.durable {
            Some(Flusher::start(self.sub("layers"))?)
        } else {
            None
        };
        let staged = self.stage_all(specs, flusher.as_ref());
        if let Some(f) = flusher {
            f.stop();
        }
        if self.durable && staged.iter().any(|s| matches!(s, Ok(Staged::Fresh { .. }))) {
            let dir = File::open(self.sub("layers")).ctx(|| "opening layers dir".into())?;
            rustix::fs::syncfs(&dir).ctx(|| "syncing layers".into())?;
        }
        let mut out = Vec::with_capacity(staged.len());
        let mut first_err = None;
        for s in staged {
            match s.and_then(|s| self.commit_layer(s)) {
                Ok(r) => out.push(r),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Stages every layer, largest blob first, on up to one worker per core.
    fn stage_all(&self, specs: &[LayerSpec], flusher: Option<&Flusher>) -> Vec<Result<Staged>> {
        let size =
            |s: &LayerSpec| std::fs::metadata(self.blob_path(&s.blob)).map_or(0, |m| m.len());
        let mut order: Vec<(u64, usize)> = specs.iter().map(size).zip(0..).collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        let slots: Vec<Mutex<Option<Result<Staged>>>> =
            specs.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let work = || {
            while let Some(&(_, i)) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                let r = self.stage_layer(&specs[i], flusher);
                if let Some(f) = flusher {
                    f.kick();
                }
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            }
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let workers = cores.min(specs.len());
        if workers <= 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 1..workers {
                    s.spawn(work);
                }
                work();
            });
        }
        slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| Err(StoreError::Invalid("layer worker panicked".into())))
            })
            .collect()
    }

    /// Unpacks one layer, or reports it present.
    pub fn unpack_layer(&self, spec: &LayerSpec) -> Result<LayerResult> {
        let mut v = self.unpack_layers(std::slice::from_ref(spec))?;
        Ok(v.pop().expect("one result per spec"))
    }

    fn commit_layer(&self, staged: Staged) -> Result<LayerResult> {
        let (mut guard, result, blob) = match staged {
            Staged::Present(r) => return Ok(r),
            Staged::Fresh {
                guard,
                result,
                blob,
            } => (guard, result, blob),
        };
        let dest = self.layer_dir(&result.diff_id);
        let fresh = rename_noreplace(guard.path(), &dest)?;
        if fresh {
            guard.disarm();
            Stats::add(&self.stats.layers_unpacked, 1);
        } else {
            Stats::add(&self.stats.layers_skipped, 1);
        }
        self.record_blob_diff_id(&blob, &result.diff_id)?;
        Ok(LayerResult {
            skipped: !fresh,
            ..result
        })
    }

    /// Reads `layers/sha256/<hex>/meta`, if the layer is present.
    pub fn layer_meta(&self, diff_id: &Digest) -> Option<LayerResult> {
        let text = std::fs::read_to_string(self.layer_dir(diff_id).join("meta")).ok()?;
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some(LayerResult {
            diff_id: diff_id.clone(),
            size: field("size")?,
            entries: field("entries")?,
            stripped: field("stripped").unwrap_or(0),
            skipped: true,
            skipped_devices: text
                .lines()
                .filter_map(|l| l.strip_prefix("skipped_device="))
                .map(str::to_string)
                .collect(),
        })
    }

    fn diff_id_of_blob(&self, blob: &Digest) -> Option<Digest> {
        let p = self.sub("layers/by-blob").join(blob.hex());
        Digest::parse(std::fs::read_to_string(p).ok()?.trim()).ok()
    }

    /// Extracts one layer into a temporary dir (or finds it present).
    fn stage_layer(&self, spec: &LayerSpec, flusher: Option<&Flusher>) -> Result<Staged> {
        // Refuse unknown media types even when the layer is already present.
        detect_compression(&spec.media_type, &[])?;
        // Only this blob's own record proves which layer it produces: a DiffID named by an image
        // config is a claim, and an unpacked layer with that DiffID may be another tenant's.
        // Without the record the blob is unpacked and checked like a new one.
        if let Some(proven) = self.diff_id_of_blob(&spec.blob) {
            if let Some(want) = &spec.expected_diff_id {
                if *want != proven {
                    return Err(StoreError::DigestMismatch {
                        expected: want.to_string(),
                        actual: proven.to_string(),
                    });
                }
            }
            if let Some(done) = self.layer_meta(&proven) {
                Stats::add(&self.stats.layers_skipped, 1);
                return Ok(Staged::Present(done));
            }
        }
        let blob_path = self.blob_path(&spec.blob);
        let mut file = match File::open(&blob_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("blob {}", spec.blob)))
            }
            Err(e) => return Err(e).ctx(|| format!("opening {}", blob_path.display())),
        };
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential).ok();
        let mut magic = [0u8; 4];
        let n = read_upto(&mut file, &mut magic).ctx(|| "reading blob".into())?;
        let compression = detect_compression(&spec.media_type, &magic[..n])?;
        let file = (&magic[..n]).chain(file);

        let tmp = self.sub("layers").join(random_name(".tmp-"));
        std::fs::create_dir(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        let guard = TempGuard::new(tmp.clone());
        let fs_dir = tmp.join("fs");
        std::fs::create_dir(&fs_dir).ctx(|| format!("creating {}", fs_dir.display()))?;
        // The store's own directories get their modes from us, not from the process umask.
        for d in [&tmp, &fs_dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(STORE_DIR_MODE))
                .ctx(|| format!("chmod {}", d.display()))?;
        }
        let root_fd = open_path_dir(&fs_dir)?;

        let (counting, compressed) = CountingReader::new(file);
        let compressed_in = BufReader::with_capacity(256 << 10, counting);
        let decoder: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(compressed_in),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(compressed_in)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(compressed_in)
                    .ctx(|| "starting zstd decoder".into())?,
            ),
        };
        let guarded = RatioGuard {
            inner: decoder,
            seen: 0,
            compressed,
            max_ratio: self.limits.max_ratio,
            max_bytes: self.limits.max_layer_bytes,
        };
        let hashing = HashingReader::new(guarded, u64::MAX, |_| unreachable_limit());

        // Decompression and the DiffID run on a helper thread; parsing and creating files here.
        let mut ex = Extractor::new(self, Root::new(root_fd), flusher);
        let (extracted, hashing) = read_ahead(hashing, |tar_in| -> Result<()> {
            let mut archive = tar::Archive::new(tar_in);
            ex.run(&mut archive)?;
            // The DiffID covers the whole stream, including the padding after the end marker.
            io::copy(&mut archive.into_inner(), &mut io::sink())
                .ctx(|| "reading layer stream".into())?;
            Ok(())
        });
        extracted?;
        let hashing =
            hashing.ok_or_else(|| StoreError::Invalid("layer decompressor panicked".into()))?;
        let (diff_id, size) = hashing.finish();
        let implicit = ex.implicit_dirs();
        ex.finish_dir_times();

        if let Some(want) = &spec.expected_diff_id {
            if *want != diff_id {
                return Err(StoreError::DigestMismatch {
                    expected: want.to_string(),
                    actual: diff_id.to_string(),
                });
            }
        }
        let result = LayerResult {
            diff_id: diff_id.clone(),
            size,
            entries: ex.entries,
            stripped: ex.stripped,
            skipped: false,
            skipped_devices: ex.skipped_devices.clone(),
        };
        let mut meta = format!(
            "diff_id={}\nblob={}\nsize={}\nentries={}\nstripped={}\n",
            diff_id, spec.blob, size, ex.entries, ex.stripped
        );
        for d in &ex.skipped_devices {
            meta.push_str(&format!("skipped_device={d}\n"));
        }
        if !implicit.is_empty() {
            // Read when the layer is stacked on others (see `chain`): these are the only
            // directories that may resolve through a symlink of a layer below.
            std::fs::write(tmp.join(IMPLICIT_DIRS_FILE), implicit.join(&0u8))
                .ctx(|| "writing implicit dirs".into())?;
        }
        std::fs::write(tmp.join("meta"), meta).ctx(|| "writing layer meta".into())?;
        Ok(Staged::Fresh {
            guard,
            result,
            blob: spec.blob.clone(),
        })
    }

    /// Records that `blob` was unpacked and hashed to `diff_id` (the proof `stage_layer` asks
    /// for). Written whole and renamed into place; a record lost in a crash only costs a
    /// re-check, and a torn one does not parse (so it proves nothing).
    fn record_blob_diff_id(&self, blob: &Digest, diff_id: &Digest) -> Result<()> {
        let dir = self.sub("layers/by-blob");
        let tmp = dir.join(random_name(".tmp-"));
        let mut guard = TempGuard::new(tmp.clone());
        {
            let mut f = File::create(&tmp).ctx(|| "writing blob index".into())?;
            f.write_all(diff_id.to_string().as_bytes())
                .ctx(|| "writing blob index".into())?;
            if self.durable {
                f.sync_all().ctx(|| "syncing blob index".into())?;
            }
        }
        std::fs::rename(&tmp, dir.join(blob.hex())).ctx(|| "renaming blob index".into())?;
        guard.disarm();
        Ok(())
    }
}

/// `layers/sha256/<diffid>/implicit`: the layer's directories that had no entry of their own,
/// NUL-separated, sorted (absent when there are none).
pub const IMPLICIT_DIRS_FILE: &str = "implicit";

/// Mode of the directories the store makes for a layer (`.tmp-*`, later `sha256/<diffid>`).
const STORE_DIR_MODE: u32 = 0o755;

fn unreachable_limit() -> StoreError {
    StoreError::LimitExceeded("stream length".into())
}

fn read_upto<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Opens a directory for use as a resolution root.
pub fn open_path_dir(p: &Path) -> Result<OwnedFd> {
    openat(
        rustix::fs::CWD,
        p,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| format!("opening {}", p.display()))
}

/// Starts writeback of a durable unpack early. A helper thread calls `syncfs` whenever it is
/// kicked (a layer finished, or `FLUSH_EVERY` more bytes were extracted), while the workers go on
/// extracting; kicks that arrive during a sync are merged into the next one. Its errors are
/// ignored: the final `syncfs` of `unpack_layers` is the one that counts.
struct Flusher {
    tx: mpsc::Sender<()>,
    stopping: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// Extracted file bytes between two kicks of the flusher.
const FLUSH_EVERY: u64 = 128 << 20;

impl Flusher {
    fn start(dir: std::path::PathBuf) -> Result<Self> {
        let dir = File::open(&dir).ctx(|| format!("opening {}", dir.display()))?;
        let (tx, rx) = mpsc::channel::<()>();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::spawn(move || {
            while rx.recv().is_ok() && !stop.load(Ordering::Relaxed) {
                while rx.try_recv().is_ok() {}
                let _ = rustix::fs::syncfs(&dir);
            }
        });
        Ok(Flusher {
            tx,
            stopping,
            thread,
        })
    }

    fn kick(&self) {
        let _ = self.tx.send(());
    }

    /// Waits for a sync in progress; pending kicks are dropped (the caller syncs next).
    fn stop(self) {
        self.stopping.store(true, Ordering::Relaxed);
        drop(self.tx);
        let _ = self.thread.join();
    }
}

/// Stops decompression bombs: total uncompressed bytes and the uncompressed/compressed ratio.
struct RatioGuard<R> {
    inner: R,
    seen: u64,
    compressed: Arc<AtomicU64>,
    max_ratio: u64,
    max_bytes: u64,
}

impl<R: Read> Read for RatioGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        if self.seen > self.max_bytes {
            return Err(StoreError::LimitExceeded(format!(
                "layer is larger than {} bytes uncompressed",
                self.max_bytes
            ))
            .into());
        }
        let packed = self.compressed.load(Ordering::Relaxed).max(1);
        if self.seen > RATIO_GRACE_BYTES && self.seen / packed > self.max_ratio {
            return Err(StoreError::LimitExceeded(format!(
                "decompression ratio above {}:1",
                self.max_ratio
            ))
            .into());
        }
        Ok(n)
    }
}

/// Largest PAX extended header we accept (xattrs make them bigger than names alone).
const MAX_PAX_BYTES: u64 = 1 << 20;

/// Extension records that describe the next real entry.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// Metadata of one entry after PAX overrides and policy.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Extractor<'s> {
    store: &'s Store,
    flusher: Option<&'s Flusher>,
    /// File bytes written since the flusher was last kicked.
    unflushed: u64,
    root: Root,
    entries: u64,
    stripped: u64,
    file_bytes: u64,
    dir_times: Vec<(Vec<u8>, Timespec)>,
    is_root: bool,
    buf: Vec<u8>,
    skipped_devices: Vec<String>,
}

/// The usual "entry is unsafe" error, with a lossily decoded name.
fn unsafe_at(path: &[u8], reason: impl Into<String>) -> StoreError {
    StoreError::unsafe_entry(String::from_utf8_lossy(path), reason)
}

fn strip_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

impl<'s> Extractor<'s> {
    fn new(store: &'s Store, root: Root, flusher: Option<&'s Flusher>) -> Self {
        Extractor {
            store,
            flusher,
            unflushed: 0,
            root,
            entries: 0,
            stripped: 0,
            file_bytes: 0,
            dir_times: Vec::new(),
            is_root: rustix::process::geteuid().is_root(),
            buf: vec![0u8; 1 << 20],
            skipped_devices: Vec::new(),
        }
    }

    fn run<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<()> {
        let entries = archive
            .entries()
            .ctx(|| "reading tar stream".into())?
            .raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry = entry.ctx(|| "reading tar header".into())?;
            let kind = entry.header().entry_type();
            let max_name = self.store.limits.max_name_len as u64 + 1;
            match kind {
                tar::EntryType::GNULongName => {
                    if pending.long_name.is_some() {
                        return Err(unsafe_at(b"?", "two GNU long names for one entry"));
                    }
                    pending.long_name = Some(strip_nuls(read_capped(
                        &mut entry,
                        max_name,
                        "GNU long name",
                    )?));
                }
                tar::EntryType::GNULongLink => {
                    if pending.long_link.is_some() {
                        return Err(unsafe_at(b"?", "two GNU long link names for one entry"));
                    }
                    pending.long_link = Some(strip_nuls(read_capped(
                        &mut entry,
                        max_name,
                        "GNU long link name",
                    )?));
                }
                tar::EntryType::XHeader => {
                    if pending.pax.is_some() {
                        return Err(unsafe_at(b"?", "two PAX headers for one entry"));
                    }
                    pending.pax = Some(read_capped(&mut entry, MAX_PAX_BYTES, "PAX header")?);
                }
                tar::EntryType::XGlobalHeader => {
                    // Global records (comments, charset) carry nothing we apply; read to bound them.
                    read_capped(&mut entry, MAX_PAX_BYTES, "PAX global header")?;
                }
                _ => {
                    let p = std::mem::take(&mut pending);
                    self.entry(&mut entry, p)?;
                }
            }
        }
        if pending.long_name.is_some() || pending.long_link.is_some() || pending.pax.is_some() {
            return Err(unsafe_at(
                b"?",
                "extension header without a following entry",
            ));
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, p: Pending) -> Result<()> {
        let hdr = entry.header().clone();
        let mut name: Option<Vec<u8>> = p.long_name;
        let mut link: Option<Vec<u8>> = p.long_link;
        let mut uid = hdr.uid().ok();
        let mut gid = hdr.gid().ok();
        let mut mtime = Timespec {
            tv_sec: hdr.mtime().unwrap_or(0).min(i64::MAX as u64) as i64,
            tv_nsec: 0,
        };
        let mut xattr_raw: Vec<(String, Vec<u8>)> = Vec::new();
        let fallback_name = hdr.path_bytes().into_owned();
        if let Some(pax) = &p.pax {
            for rec in tar::PaxExtensions::new(pax) {
                let rec = rec.map_err(|_| unsafe_at(&fallback_name, "malformed PAX record"))?;
                let key = rec
                    .key()
                    .map_err(|_| unsafe_at(&fallback_name, "non-UTF-8 PAX key"))?;
                let val = rec.value_bytes();
                match key {
                    "path" => {
                        if name.is_some() {
                            return Err(unsafe_at(val, "both a GNU long name and a PAX path"));
                        }
                        name = Some(val.to_vec());
                    }
                    "linkpath" => {
                        if link.is_some() {
                            return Err(unsafe_at(
                                &fallback_name,
                                "both a GNU long link and a PAX linkpath",
                            ));
                        }
                        link = Some(val.to_vec());
                    }
                    "size" => {
                        // The tar reader positions by the header size; a different PAX size
                        // would make us and other tools see different archives.
                        let size = std::str::from_utf8(val)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok());
                        if size != Some(hdr.entry_size().unwrap_or(u64::MAX)) {
                            return Err(unsafe_at(
                                &fallback_name,
                                "PAX size disagrees with the header",
                            ));
                        }
                    }
                    "uid" => uid = parse_num(val),
                    "gid" => gid = parse_num(val),
                    "mtime" => {
                        mtime = parse_pax_time(val)
                            .ok_or_else(|| unsafe_at(&fallback_name, "malformed PAX mtime"))?
                    }
                    k if k.starts_with("GNU.sparse.") => {
                        return Err(unsafe_at(&fallback_name, "sparse files are not supported"))
                    }
                    k if k.starts_with("SCHILY.xattr.") => {
                        xattr_raw.push((k["SCHILY.xattr.".len()..].to_string(), val.to_vec()))
                    }
                    _ => {}
                }
            }
        }
        let raw_name = name.unwrap_or(fallback_name);
        self.entries += 1;
        if self.entries > self.store.limits.max_entries {
            return Err(StoreError::LimitExceeded(format!(
                "layer has more than {} entries",
                self.store.limits.max_entries
            )));
        }
        let comps = self.split(&raw_name, &raw_name, "")?;
        let kind = hdr.entry_type();

        // Whiteouts first: they are regular files in the tar but become overlayfs markers.
        if let Some((base, parent)) = comps.split_last() {
            if let Some(target) = base.strip_prefix(b".wh.") {
                if target == b".wh..opq" {
                    return self.opaque(parent, &raw_name);
                }
                if target.starts_with(b".wh.") {
                    return Ok(()); // AUFS bookkeeping (.wh..wh.plnk etc.): nothing to apply
                }
                if target.is_empty() || target == b"." || target == b".." {
                    return Err(unsafe_at(&raw_name, "whiteout of an invalid name"));
                }
                return self.whiteout(parent, target, &raw_name);
            }
        }

        let uid = uid
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| unsafe_at(&raw_name, "uid out of range"))?;
        let gid = gid
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| unsafe_at(&raw_name, "gid out of range"))?;
        let is_dir = kind == tar::EntryType::Directory
            || (kind == tar::EntryType::Regular && raw_name.ends_with(b"/"));
        let mut mode = hdr
            .mode()
            .map_err(|_| unsafe_at(&raw_name, "malformed mode"))?
            & 0o7777;
        // Policy: setuid/setgid on non-directories are stripped, not refused, so ordinary
        // distribution images (su, passwd, mount) still import. setgid on directories only
        // steers group inheritance and is kept.
        if !self.store.policy.allow_setid && !is_dir && mode & 0o6000 != 0 {
            mode &= !0o6000;
            self.stripped += 1;
        }
        let mut xattrs = Vec::with_capacity(xattr_raw.len());
        for (k, v) in xattr_raw {
            if self.keep_xattr(&k, &raw_name)? {
                xattrs.push((k, v));
            }
        }
        let meta = Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        };

        if is_dir {
            return self.dir(&comps, &raw_name, &meta);
        }
        let Some((base, parent)) = comps.split_last() else {
            return Err(unsafe_at(
                &raw_name,
                "non-directory entry for the layer root",
            ));
        };
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.file(parent, base, &raw_name, &meta, entry)
            }
            tar::EntryType::Symlink => {
                let target = link
                    .or_else(|| hdr.link_name_bytes().map(|c| c.into_owned()))
                    .unwrap_or_default();
                if target.is_empty() || target.contains(&0) {
                    return Err(unsafe_at(&raw_name, "empty or malformed symlink target"));
                }
                if target.len() > self.store.limits.max_name_len {
                    return Err(StoreError::LimitExceeded(format!(
                        "symlink target of {:?} is longer than {} bytes",
                        String::from_utf8_lossy(&raw_name),
                        self.store.limits.max_name_len
                    )));
                }
                self.symlink(parent, base, &raw_name, &target, &meta)
            }
            tar::EntryType::Link => {
                let target = link
                    .or_else(|| hdr.link_name_bytes().map(|c| c.into_owned()))
                    .unwrap_or_default();
                self.hardlink(parent, base, &comps, &raw_name, &target)
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = hdr.device_major().ok().flatten().unwrap_or(0);
                let minor = hdr.device_minor().ok().flatten().unwrap_or(0);
                self.device(parent, base, &raw_name, kind, major, minor, &meta)
            }
            tar::EntryType::GNUSparse => {
                Err(unsafe_at(&raw_name, "sparse files are not supported"))
            }
            other => Err(unsafe_at(
                &raw_name,
                format!("unsupported entry type {:?}", other.as_byte() as char),
            )),
        }
    }

    /// Validates a name, mapping failures to the right error.
    fn split<'a>(&self, raw: &'a [u8], shown: &[u8], what: &str) -> Result<Vec<&'a [u8]>> {
        split_name(raw, self.store.limits.max_name_len).map_err(|e| match e {
            NameError::Unsafe(r) => unsafe_at(shown, format!("{what}{r}")),
            NameError::TooLong => StoreError::LimitExceeded(format!(
                "{what}name {:?} is too long or too deep",
                String::from_utf8_lossy(&raw[..raw.len().min(120)])
            )),
        })
    }

    /// Which xattrs an untrusted image may set.
    fn keep_xattr(&mut self, key: &str, path: &[u8]) -> Result<bool> {
        if key.starts_with("trusted.overlay.") || key.starts_with("user.overlay.") {
            // These steer overlayfs itself (redirects, metacopy, opaque): only whiteout entries
            // may produce them.
            return Err(unsafe_at(path, format!("overlayfs xattr {key} in layer")));
        }
        if key == "security.capability" {
            if self.store.policy.allow_setid {
                return Ok(true);
            }
            self.stripped += 1;
            return Ok(false);
        }
        Ok(key.starts_with("user.")
            || key.starts_with("security.")
            || key == "system.posix_acl_access"
            || key == "system.posix_acl_default")
    }

    fn parent(&mut self, parent: &[&[u8]], path: &[u8]) -> Result<BorrowedFd<'_>> {
        match self.root.dir(parent, true) {
            Ok(fd) => Ok(fd),
            Err(e) => Err(unsafe_at(path, e.reason())),
        }
    }

    fn parent_owned(&mut self, parent: &[&[u8]], path: &[u8]) -> Result<OwnedFd> {
        self.root
            .open_dir_owned(parent, true)
            .map_err(|e| unsafe_at(path, e.reason()))
    }

    /// Runs `make` in the parent dir; if the name exists, removes it (refusing to remove a
    /// non-empty directory) and tries once more.
    fn create<T>(
        &mut self,
        parent: &[&[u8]],
        name: &[u8],
        path: &[u8],
        mut make: impl FnMut(BorrowedFd<'_>) -> rustix::io::Result<T>,
    ) -> Result<T> {
        let first = {
            let pfd = self.parent(parent, path)?;
            make(pfd)
        };
        match first {
            Ok(v) => Ok(v),
            Err(Errno::EXIST) => {
                let pfd = self.parent_owned(parent, path)?;
                self.remove_existing(&pfd, name, path)?;
                make(pfd.as_fd()).ctx(|| format!("creating {}", String::from_utf8_lossy(path)))
            }
            Err(e) => Err(e).ctx(|| format!("creating {}", String::from_utf8_lossy(path))),
        }
    }

    fn remove_existing(&mut self, pfd: &OwnedFd, name: &[u8], path: &[u8]) -> Result<()> {
        let st = statat(pfd, name, AtFlags::SYMLINK_NOFOLLOW)
            .ctx(|| format!("inspecting {}", String::from_utf8_lossy(path)))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            // A cached descriptor could point at (or below) the directory being removed.
            self.root.invalidate();
            match unlinkat(pfd, name, AtFlags::REMOVEDIR) {
                Ok(()) => Ok(()),
                Err(Errno::NOTEMPTY) => Err(unsafe_at(path, "replaces a non-empty directory")),
                Err(e) => Err(e).ctx(|| format!("removing {}", String::from_utf8_lossy(path))),
            }
        } else {
            unlinkat(pfd, name, AtFlags::empty())
                .ctx(|| format!("removing {}", String::from_utf8_lossy(path)))
        }
    }

    /// chown, then xattrs, then chmod (chown clears setid bits, so the mode goes last). Each
    /// step runs only if it changes something: nodes are created with their final permission
    /// bits, and most images are owned by root, so usually one fstat replaces two setattrs.
    fn apply_fd(&self, fd: BorrowedFd<'_>, path: &[u8], m: &Meta) -> Result<()> {
        let shown = || String::from_utf8_lossy(path).into_owned();
        let st = fstat(fd).ctx(|| format!("inspecting {}", shown()))?;
        let mut chmod = st.st_mode & 0o7777 != m.mode;
        if self.is_root && (st.st_uid != m.uid || st.st_gid != m.gid) {
            fchown(fd, Some(Uid::from_raw(m.uid)), Some(Gid::from_raw(m.gid)))
                .ctx(|| format!("chown {}", shown()))?;
            chmod = true;
        }
        for (k, v) in &m.xattrs {
            match fsetxattr(fd, k.as_str(), v, XattrFlags::empty()) {
                Ok(()) | Err(Errno::NOTSUP) => {}
                Err(e) => return Err(e).ctx(|| format!("setxattr {k} on {}", shown())),
            }
            // An ACL rewrites the group bits: set the mode again after it.
            chmod = true;
        }
        if chmod {
            fchmod(fd, Mode::from_raw_mode(m.mode)).ctx(|| format!("chmod {}", shown()))?;
        }
        Ok(())
    }

    fn apply_at(
        &self,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        m: &Meta,
        chmod: bool,
    ) -> Result<()> {
        let shown = || String::from_utf8_lossy(path).into_owned();
        if self.is_root {
            let st = statat(pfd, name, AtFlags::SYMLINK_NOFOLLOW)
                .ctx(|| format!("inspecting {}", shown()))?;
            if st.st_uid != m.uid || st.st_gid != m.gid {
                chownat(
                    pfd,
                    name,
                    Some(Uid::from_raw(m.uid)),
                    Some(Gid::from_raw(m.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .ctx(|| format!("chown {}", shown()))?;
            }
        }
        if chmod {
            // Only reached for nodes we just created (never symlinks), so following is moot.
            rustix::fs::chmodat(pfd, name, Mode::from_raw_mode(m.mode), AtFlags::empty())
                .ctx(|| format!("chmod {}", shown()))?;
        }
        let ts = Timestamps {
            last_access: m.mtime,
            last_modification: m.mtime,
        };
        utimensat(pfd, name, &ts, AtFlags::SYMLINK_NOFOLLOW).ctx(|| format!("utimes {}", shown()))
    }

    fn file<R: Read>(
        &mut self,
        parent: &[&[u8]],
        name: &[u8],
        path: &[u8],
        m: &Meta,
        data: &mut tar::Entry<'_, R>,
    ) -> Result<()> {
        let size = data.header().entry_size().unwrap_or(0);
        self.file_bytes = self.file_bytes.saturating_add(size);
        if self.file_bytes > self.store.limits.max_layer_bytes {
            return Err(StoreError::LimitExceeded(format!(
                "layer is larger than {} bytes uncompressed",
                self.store.limits.max_layer_bytes
            )));
        }
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = self.create(parent, name, path, |pfd| {
            openat(pfd, name, flags, Mode::from_raw_mode(m.mode & 0o777))
        })?;
        let mut out = File::from(fd);
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(e).ctx(|| format!("reading {}", String::from_utf8_lossy(path)))
                }
            };
            out.write_all(&self.buf[..n])
                .ctx(|| format!("writing {}", String::from_utf8_lossy(path)))?;
        }
        self.apply_fd(out.as_fd(), path, m)?;
        let ts = Timestamps {
            last_access: m.mtime,
            last_modification: m.mtime,
        };
        futimens(&out, &ts).ctx(|| format!("utimes {}", String::from_utf8_lossy(path)))?;
        self.unflushed += size;
        if self.unflushed >= FLUSH_EVERY {
            if let Some(f) = self.flusher {
                f.kick();
            }
            self.unflushed = 0;
        }
        Ok(())
    }

    fn dir(&mut self, comps: &[&[u8]], path: &[u8], m: &Meta) -> Result<()> {
        let fd = match comps.split_last() {
            None => openat(
                self.root.fd(),
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ctx(|| "opening layer root".into())?,
            Some((name, parent)) => {
                let dflags =
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let pfd = self.parent_owned(parent, path)?;
                let perm = Mode::from_raw_mode(m.mode & 0o777);
                match mkdirat(&pfd, *name, perm) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => {
                        let st = statat(&pfd, *name, AtFlags::SYMLINK_NOFOLLOW)
                            .ctx(|| format!("inspecting {}", String::from_utf8_lossy(path)))?;
                        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                            self.remove_existing(&pfd, name, path)?;
                            mkdirat(&pfd, *name, perm)
                                .ctx(|| format!("mkdir {}", String::from_utf8_lossy(path)))?;
                        }
                    }
                    Err(e) => {
                        return Err(e).ctx(|| format!("mkdir {}", String::from_utf8_lossy(path)))
                    }
                }
                openat(&pfd, *name, dflags, Mode::empty())
                    .ctx(|| format!("opening {}", String::from_utf8_lossy(path)))?
            }
        };
        if comps.is_empty() {
            // `./` is the store's directory `layers/sha256/<diffid>/fs`: the layer may give it an
            // owner and read/execute bits, never group or world write.
            let root_meta = Meta {
                mode: m.mode & !0o022 & 0o1777,
                uid: m.uid,
                gid: m.gid,
                mtime: m.mtime,
                xattrs: m.xattrs.clone(),
            };
            self.apply_fd(fd.as_fd(), path, &root_meta)?;
        } else {
            self.apply_fd(fd.as_fd(), path, m)?;
        }
        // Directory mtimes change as children are added, so they are set at the very end.
        self.dir_times.push((comps.join(&b'/'), m.mtime));
        if !comps.is_empty() {
            self.root.remember(comps, fd);
        }
        Ok(())
    }

    fn symlink(
        &mut self,
        parent: &[&[u8]],
        name: &[u8],
        path: &[u8],
        target: &[u8],
        m: &Meta,
    ) -> Result<()> {
        self.create(parent, name, path, |pfd| symlinkat(target, pfd, name))?;
        let pfd = self.parent_owned(parent, path)?;
        // xattrs on symlinks are not restored (only trusted.* and security.* can exist there).
        self.apply_at(pfd.as_fd(), name, path, m, false)
    }

    fn hardlink(
        &mut self,
        parent: &[&[u8]],
        name: &[u8],
        comps: &[&[u8]],
        path: &[u8],
        target: &[u8],
    ) -> Result<()> {
        let tcomps = self.split(target, path, "hard link target: ")?;
        let Some((tname, tparent)) = tcomps.split_last() else {
            return Err(unsafe_at(path, "hard link to the layer root"));
        };
        if tcomps == comps {
            return Ok(());
        }
        let tfd = match self.root.open_dir_owned(tparent, false) {
            Ok(fd) => fd,
            Err(ResolveError::Missing) => {
                return Err(unsafe_at(
                    path,
                    "hard link target does not exist in the layer",
                ))
            }
            Err(e) => return Err(unsafe_at(path, format!("hard link target: {}", e.reason()))),
        };
        match statat(&tfd, *tname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(unsafe_at(path, "hard link to a directory"))
            }
            Ok(_) => {}
            Err(Errno::NOENT) => {
                return Err(unsafe_at(
                    path,
                    "hard link target does not exist in the layer",
                ))
            }
            Err(e) => {
                return Err(e).ctx(|| {
                    format!(
                        "inspecting link target of {}",
                        String::from_utf8_lossy(path)
                    )
                })
            }
        }
        self.create(parent, name, path, |pfd| {
            linkat(&tfd, *tname, pfd, name, AtFlags::empty())
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn device(
        &mut self,
        parent: &[&[u8]],
        name: &[u8],
        path: &[u8],
        kind: tar::EntryType,
        major: u32,
        minor: u32,
        m: &Meta,
    ) -> Result<()> {
        let is_whiteout = kind == tar::EntryType::Char && major == 0 && minor == 0;
        if is_whiteout {
            // An overlay-form whiteout (0/0 char device) is harmless: it cannot be opened.
            return self.whiteout(parent, name, path);
        }
        if !self.store.policy.allow_devices {
            // Left out, not refused: `podman import` of a debootstrap tree carries /dev/null,
            // /dev/full, ... and the runtimes mount their own /dev. The caller reports them.
            if self.skipped_devices.len() < MAX_LISTED_DEVICES {
                // Escaped so that a name cannot forge lines in the layer's meta file.
                let shown: String = String::from_utf8_lossy(path).escape_debug().collect();
                self.skipped_devices.push(shown);
            }
            return Ok(());
        }
        let ft = match kind {
            tar::EntryType::Fifo => FileType::Fifo,
            tar::EntryType::Block => FileType::BlockDevice,
            _ => FileType::CharacterDevice,
        };
        let dev = if ft == FileType::Fifo {
            0
        } else {
            makedev(major, minor)
        };
        self.create(parent, name, path, |pfd| {
            mknodat(pfd, name, ft, Mode::from(0o600), dev)
        })?;
        let pfd = self.parent_owned(parent, path)?;
        self.apply_at(pfd.as_fd(), name, path, m, true)
    }

    fn whiteout(&mut self, parent: &[&[u8]], target: &[u8], path: &[u8]) -> Result<()> {
        self.create(parent, target, path, |pfd| {
            mknodat(
                pfd,
                target,
                FileType::CharacterDevice,
                Mode::empty(),
                makedev(0, 0),
            )
        })
    }

    fn opaque(&mut self, parent: &[&[u8]], path: &[u8]) -> Result<()> {
        let pfd = self.parent_owned(parent, path)?;
        let dir = openat(
            &pfd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx(|| "opening opaque dir".into())?;
        fsetxattr(&dir, "trusted.overlay.opaque", b"y", XattrFlags::empty())
            .ctx(|| format!("marking {} opaque", String::from_utf8_lossy(path)))
    }

    /// Directories created only as parents of other entries (no directory entry of their
    /// own anywhere in the layer), sorted so that parents come before their children.
    fn implicit_dirs(&mut self) -> Vec<Vec<u8>> {
        let created = self.root.take_created();
        if created.is_empty() {
            return created;
        }
        let explicit: std::collections::HashSet<&[u8]> =
            self.dir_times.iter().map(|(p, _)| p.as_slice()).collect();
        let mut out: Vec<Vec<u8>> = created
            .into_iter()
            .filter(|p| !explicit.contains(p.as_slice()))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Sets directory mtimes last (creating children changed them).
    fn finish_dir_times(&mut self) {
        self.root.invalidate();
        let times = std::mem::take(&mut self.dir_times);
        for (path, t) in times {
            let ts = Timestamps {
                last_access: t,
                last_modification: t,
            };
            let comps: Vec<&[u8]> = if path.is_empty() {
                Vec::new()
            } else {
                path.split(|&b| b == b'/').collect()
            };
            match comps.split_last() {
                None => {
                    if let Ok(fd) = openat(
                        self.root.fd(),
                        ".",
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        let _ = futimens(&fd, &ts);
                    }
                }
                Some((name, parent)) => {
                    // Best effort: the directory may have been replaced by a later entry.
                    if let Ok(pfd) = self.root.open_dir_owned(parent, false) {
                        let _ = utimensat(&pfd, *name, &ts, AtFlags::SYMLINK_NOFOLLOW);
                    }
                }
            }
        }
    }
}

fn read_capped<R: Read>(entry: &mut tar::Entry<'_, R>, cap: u64, what: &str) -> Result<Vec<u8>> {
    let size = entry.header().entry_size().unwrap_or(u64::MAX);
    if size > cap {
        return Err(StoreError::LimitExceeded(format!(
            "{what} of {size} bytes (limit {cap})"
        )));
    }
    let mut v = Vec::with_capacity(size as usize);
    entry
        .take(cap)
        .read_to_end(&mut v)
        .ctx(|| format!("reading {what}"))?;
    Ok(v)
}

fn parse_num(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// PAX times are decimal seconds with an optional fraction, possibly negative.
fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some(Timespec {
        tv_sec: secs,
        tv_nsec: if s.starts_with('-') { -nanos } else { nanos } as _,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{Limits, Policy};
    use std::path::PathBuf;

    pub(crate) fn store(policy: Policy) -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(random_name("bulkhead-unpack-test-"));
        (Store::open(&dir, policy, Limits::default()).unwrap(), dir)
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    pub(crate) type RawEntry<'a> = (tar::EntryType, &'a str, &'a [u8], &'a str);

    /// Builds a tar with raw names (bypassing the builder's own path checks).
    pub(crate) fn raw_tar(entries: &[RawEntry]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, name, data, link) in entries {
            let mut h = header(*kind, data.len() as u64, 0o644);
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    pub(crate) fn ingest_and_unpack(s: &Store, tar_bytes: &[u8]) -> Result<LayerResult> {
        let blob = s.ingest_reader(tar_bytes, None, None).unwrap().digest;
        s.unpack_layer(&LayerSpec {
            blob,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            expected_diff_id: None,
        })
    }

    fn layer_tmp_dirs(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("layers"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-")
            })
            .count()
    }

    #[test]
    fn unpacks_files_dirs_links_and_whiteouts() {
        let (s, dir) = store(Policy::default());
        let t = raw_tar(&[
            (tar::EntryType::Directory, "./etc/", b"", ""),
            (tar::EntryType::Regular, "./etc/passwd", b"root:x:0:0\n", ""),
            (tar::EntryType::Link, "./etc/passwd2", b"", "etc/passwd"),
            (tar::EntryType::Symlink, "./etc/link", b"", "/etc/passwd"),
            (tar::EntryType::Regular, "./etc/.wh.gone", b"", ""),
            (tar::EntryType::Regular, "./var/.wh..wh..opq", b"", ""),
        ]);
        let r = ingest_and_unpack(&s, &t).unwrap();
        assert_eq!(r.diff_id, Digest::of(&t));
        assert_eq!(r.size, t.len() as u64);
        let fs = s.layer_dir(&r.diff_id).join("fs");
        assert_eq!(
            std::fs::read(fs.join("etc/passwd")).unwrap(),
            b"root:x:0:0\n"
        );
        assert_eq!(
            std::fs::read_link(fs.join("etc/link")).unwrap(),
            Path::new("/etc/passwd")
        );
        let st = statat(
            rustix::fs::CWD,
            fs.join("etc/gone"),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert_eq!(
            FileType::from_raw_mode(st.st_mode),
            FileType::CharacterDevice
        );
        assert_eq!(st.st_rdev, 0);
        let mut buf = [0u8; 4];
        let n =
            rustix::fs::getxattr(fs.join("var"), "trusted.overlay.opaque", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"y");
        // A second unpack does no work.
        assert!(ingest_and_unpack(&s, &t).unwrap().skipped);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_write_through_symlink_and_leaves_nothing() {
        let (s, dir) = store(Policy::default());
        let outside = std::env::temp_dir().join(random_name("bulkhead-canary-"));
        std::fs::create_dir(&outside).unwrap();
        let target = outside.to_str().unwrap().to_string();
        let t = raw_tar(&[
            (tar::EntryType::Symlink, "evil", b"", &target),
            (tar::EntryType::Regular, "evil/pwned", b"x", ""),
        ]);
        match ingest_and_unpack(&s, &t).unwrap_err() {
            StoreError::UnsafeEntry { path, reason } => {
                assert_eq!(path, "evil/pwned");
                assert_eq!(reason, "path traverses a symlink");
            }
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert_eq!(layer_tmp_dirs(&dir), 0);
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(outside).unwrap();
    }

    #[test]
    fn refuses_escaping_names_and_links() {
        let cases: &[(&[RawEntry], &str)] = &[
            (
                &[(tar::EntryType::Regular, "../x", b"", "")],
                "parent directory component",
            ),
            (
                &[(tar::EntryType::Regular, "/abs", b"", "")],
                "absolute path",
            ),
            (
                &[(tar::EntryType::Link, "l", b"", "../../etc/passwd")],
                "hard link target: parent directory component",
            ),
            (
                &[(tar::EntryType::Link, "l", b"", "missing")],
                "hard link target does not exist in the layer",
            ),
            (
                &[(tar::EntryType::Regular, "a/.wh...", b"", "")],
                "whiteout of an invalid name",
            ),
        ];
        for (entries, reason) in cases {
            let (s, dir) = store(Policy::default());
            match ingest_and_unpack(&s, &raw_tar(entries)) {
                Err(StoreError::UnsafeEntry { reason: r, .. }) => assert_eq!(&r, reason),
                other => panic!("{reason}: unexpected {other:?}"),
            }
            assert_eq!(layer_tmp_dirs(&dir), 0);
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    fn spec(blob: &Digest, expected: Option<Digest>) -> LayerSpec {
        LayerSpec {
            blob: blob.clone(),
            media_type: String::new(),
            expected_diff_id: expected,
        }
    }

    #[test]
    fn a_claimed_diff_id_does_not_reuse_a_layer_the_blob_never_produced() {
        let (s, dir) = store(Policy::default());
        let secret = raw_tar(&[(tar::EntryType::Regular, "secret", b"globex", "")]);
        let secret_blob = s.ingest_reader(&secret[..], None, None).unwrap().digest;
        let victim = s.unpack_layer(&spec(&secret_blob, None)).unwrap().diff_id;
        let forged = raw_tar(&[(tar::EntryType::Regular, "x", b"", "")]);
        let forged_blob = s.ingest_reader(&forged[..], None, None).unwrap().digest;
        match s.unpack_layer(&spec(&forged_blob, Some(victim.clone()))) {
            Err(StoreError::DigestMismatch { expected, actual }) => {
                assert_eq!(expected, victim.to_string());
                assert_eq!(actual, Digest::of(&forged).to_string());
            }
            other => panic!("unexpected {other:?}"),
        }
        // Once checked, the same claim is refused from the record, across store instances.
        let again = Store::open(&dir, Policy::default(), Limits::default()).unwrap();
        assert!(matches!(
            again.unpack_layer(&spec(&forged_blob, Some(victim.clone()))),
            Err(StoreError::DigestMismatch { .. })
        ));
        // The blob that really produces the layer is proven by its record: no work.
        let r = again
            .unpack_layer(&spec(&secret_blob, Some(victim)))
            .unwrap();
        assert!(r.skipped);
        assert_eq!(again.stats.layers_unpacked.load(Ordering::Relaxed), 0);
        assert_eq!(layer_tmp_dirs(&dir), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_second_blob_of_a_present_layer_is_unpacked_and_checked() {
        let (s, dir) = store(Policy::default());
        let t = raw_tar(&[(tar::EntryType::Regular, "f", b"data", "")]);
        let plain = s.ingest_reader(&t[..], None, None).unwrap().digest;
        let diff_id = s.unpack_layer(&spec(&plain, None)).unwrap().diff_id;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t).unwrap();
        let gz = gz.finish().unwrap();
        let gz_blob = s.ingest_reader(&gz[..], None, None).unwrap().digest;
        let r = s
            .unpack_layer(&spec(&gz_blob, Some(diff_id.clone())))
            .unwrap();
        assert_eq!(r.diff_id, diff_id);
        // It was really read: the record of the gzip blob now exists.
        assert_eq!(s.diff_id_of_blob(&gz_blob), Some(diff_id));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_root_entry_never_makes_the_store_directories_writable_to_others() {
        let (s, dir) = store(Policy::default());
        let mut t = Vec::new();
        for (name, mode) in [("./", 0o777u32), ("./tmp/", 0o1777)] {
            let mut h = header(tar::EntryType::Directory, 0, mode);
            h.set_path(name).unwrap();
            h.set_cksum();
            t.extend_from_slice(h.as_bytes());
        }
        t.resize(t.len() + 1024, 0);
        let r = ingest_and_unpack(&s, &t).unwrap();
        let mode = |p: &Path| {
            statat(rustix::fs::CWD, p, AtFlags::SYMLINK_NOFOLLOW)
                .unwrap()
                .st_mode
                & 0o7777
        };
        let layer = s.layer_dir(&r.diff_id);
        assert_eq!(mode(&layer.join("fs")), 0o755);
        assert_eq!(mode(&layer) & 0o022, 0);
        // The layer's own entries keep their odd modes.
        assert_eq!(mode(&layer.join("fs/tmp")), 0o1777);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn device_nodes_are_left_out_and_listed() {
        let (s, dir) = store(Policy::default());
        let t = raw_tar(&[
            (tar::EntryType::Directory, "./dev/", b"", ""),
            (tar::EntryType::Block, "./dev/sda", b"", ""),
            (
                tar::EntryType::Fifo,
                "./run/pipe\nskipped_device=x",
                b"",
                "",
            ),
            (tar::EntryType::Regular, "./etc/hostname", b"deb", ""),
        ]);
        // A real /dev/full (1:7), not a 0:0 whiteout, goes first.
        let mut full = header(tar::EntryType::Char, 0, 0o666);
        full.set_path("./dev/full").unwrap();
        full.set_device_major(1).unwrap();
        full.set_device_minor(7).unwrap();
        full.set_cksum();
        let t = [full.as_bytes().as_slice(), &t].concat();
        let r = ingest_and_unpack(&s, &t).unwrap();
        assert_eq!(
            r.skipped_devices,
            ["dev/full", "./dev/sda", "./run/pipe\\nskipped_device=x"]
        );
        let fs = s.layer_dir(&r.diff_id).join("fs");
        assert_eq!(std::fs::read_dir(fs.join("dev")).unwrap().count(), 0);
        assert!(!fs.join("run/pipe").exists());
        assert_eq!(std::fs::read(fs.join("etc/hostname")).unwrap(), b"deb");
        // The list survives: a later import of the same layer reports it too.
        assert_eq!(
            s.layer_meta(&r.diff_id).unwrap().skipped_devices,
            r.skipped_devices
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn strips_setuid_by_default() {
        let (s, dir) = store(Policy::default());
        let mut t = Vec::new();
        let mut h = header(tar::EntryType::Regular, 1, 0o4755);
        h.set_path("su").unwrap();
        h.set_cksum();
        t.extend_from_slice(h.as_bytes());
        t.extend_from_slice(b"x");
        t.resize(2048 + 512, 0);
        let r = ingest_and_unpack(&s, &t).unwrap();
        assert_eq!(r.stripped, 1);
        let st = statat(
            rustix::fs::CWD,
            s.layer_dir(&r.diff_id).join("fs/su"),
            AtFlags::empty(),
        )
        .unwrap();
        assert_eq!(st.st_mode & 0o7777, 0o755);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn modes_are_exact_whatever_the_umask() {
        let (s, dir) = store(Policy::default());
        let mut t = Vec::new();
        let mut add = |kind, name: &str, mode, data: &[u8]| {
            let mut h = header(kind, data.len() as u64, mode);
            h.set_path(name).unwrap();
            h.set_cksum();
            t.extend_from_slice(h.as_bytes());
            t.extend_from_slice(data);
            t.resize(t.len().div_ceil(512) * 512, 0);
        };
        add(tar::EntryType::Directory, "shared/", 0o2777, b"");
        add(tar::EntryType::Regular, "shared/open", 0o777, b"x");
        add(tar::EntryType::Regular, "shared/ro", 0o444, b"y");
        add(tar::EntryType::Regular, "shared/none", 0o000, b"z");
        add(tar::EntryType::Directory, "shared/sub/", 0o700, b"");
        t.resize(t.len() + 1024, 0);
        let r = ingest_and_unpack(&s, &t).unwrap();
        let fs = s.layer_dir(&r.diff_id).join("fs");
        let mode = |p: &str| {
            statat(rustix::fs::CWD, fs.join(p), AtFlags::SYMLINK_NOFOLLOW)
                .unwrap()
                .st_mode
                & 0o7777
        };
        assert_eq!(mode("shared"), 0o2777);
        assert_eq!(mode("shared/open"), 0o777);
        assert_eq!(mode("shared/ro"), 0o444);
        assert_eq!(mode("shared/none"), 0o000);
        // Created inside a setgid directory, it inherited the bit; the entry says it has none.
        assert_eq!(mode("shared/sub"), 0o700);
        assert_eq!(std::fs::read(fs.join("shared/ro")).unwrap(), b"y");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn parallel_unpacks_answer_in_the_callers_order() {
        let (s, dir) = store(Policy::default());
        let small = raw_tar(&[(tar::EntryType::Regular, "a", b"small", "")]);
        let big_data = vec![9u8; 3 << 20];
        let big = raw_tar(&[(tar::EntryType::Regular, "b", &big_data, "")]);
        let blobs: Vec<Digest> = [&small, &big, &small]
            .iter()
            .map(|t| s.ingest_reader(&t[..], None, None).unwrap().digest)
            .collect();
        let specs: Vec<LayerSpec> = blobs
            .iter()
            .map(|b| LayerSpec {
                blob: b.clone(),
                media_type: String::new(),
                expected_diff_id: None,
            })
            .collect();
        let got = s.unpack_layers(&specs).unwrap();
        let ids: Vec<Digest> = got.iter().map(|r| r.diff_id.clone()).collect();
        assert_eq!(
            ids,
            [Digest::of(&small), Digest::of(&big), Digest::of(&small)]
        );
        // The same layer twice in one call: one unpacks, the other finds it there.
        assert_eq!(got.iter().filter(|r| r.skipped).count(), 1);
        assert_eq!(layer_tmp_dirs(&dir), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn detects_compression_by_magic() {
        assert_eq!(
            detect_compression("", &[0x1f, 0x8b, 8, 0]).unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            detect_compression(
                "application/vnd.oci.image.layer.v1.tar",
                &[0x28, 0xb5, 0x2f, 0xfd]
            )
            .unwrap(),
            Compression::Zstd
        );
        assert!(detect_compression("text/plain", b"abcd").is_err());
    }

    #[test]
    fn parses_pax_times() {
        assert_eq!(parse_pax_time(b"12.5").unwrap().tv_nsec, 500_000_000);
        assert_eq!(parse_pax_time(b"12").unwrap().tv_sec, 12);
        assert!(parse_pax_time(b"x").is_none());
    }
}
