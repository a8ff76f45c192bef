//! Backing up a directory: a descriptor-based walk that never follows a symlink (the tree belongs
//! to a tenant and may change under us), content-defined chunking of each regular file, and
//! parallel hashing, compression and writing of the chunks (rayon).
//!
//! Given the previous backup's manifest, a file whose size, mtime, ctime and inode are unchanged
//! reuses its chunk list without being read (the "files cache" of borg and restic), which is what
//! makes a second backup of an unchanged tree a walk of `stat` calls.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use fastcdc::v2020::FastCDC;
use rayon::prelude::*;
use rustix::fs::{fstat, openat, readlinkat, statat, AtFlags, FileType, Mode, OFlags, Stat};

use super::chunks::{ChunkBatch, ChunkStore};
use super::manifest::{ChunkRef, Entry, Kind, Manifest, Name, Totals, VERSION};
use super::{AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::safepath::open_regular;
use crate::store::MAX_DEPTH;

/// Bytes of a file read at once; cut points are found in it, its chunks stored in parallel.
const SEGMENT: usize = 4 * MAX_CHUNK;

/// What a backup did.
#[derive(Clone, Debug, Default)]
pub struct BackupStats {
    pub manifest: String,
    pub entries: u64,
    pub files: u64,
    /// Bytes of all regular files in the tree.
    pub source_bytes: u64,
    /// Bytes actually read (files whose metadata changed, or all without a previous manifest).
    pub bytes_read: u64,
    /// Files reused from the previous manifest without reading.
    pub files_unchanged: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    /// Compressed bytes written for new chunks.
    pub new_chunk_bytes: u64,
    pub new_raw_bytes: u64,
    pub reused_chunks: u64,
    /// Distinct chunks of this backup and their stored (compressed) bytes.
    pub distinct_chunks: u64,
    pub stored_bytes: u64,
    /// Device nodes and sockets left out (escaped names).
    pub skipped: Vec<String>,
}

/// Progress: called with (bytes of the tree done, bytes of the tree in total if known).
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// (device, inode).
type InodeKey = (u64, u64);

struct Walker<'a> {
    batch: ChunkBatch<'a>,
    previous: HashMap<Vec<u8>, Entry>,
    /// (device, inode) of files with several names -> their size and chunks.
    links: Mutex<HashMap<InodeKey, (u64, Vec<ChunkRef>)>>,
    /// Which paths are such names.
    linked: Mutex<HashMap<Vec<u8>, InodeKey>>,
    bytes_read: AtomicU64,
    done: AtomicU64,
    progress: Option<Progress<'a>>,
    skipped: Mutex<Vec<String>>,
    unchanged: AtomicU64,
    buffers: Mutex<Vec<Vec<u8>>>,
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(rel.len() + 1 + name.len());
    p.extend_from_slice(rel);
    if !rel.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn shown(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn meta(path: Vec<u8>, kind: Kind, st: &Stat) -> Entry {
    Entry {
        path: Name(path),
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        size: 0,
        chunks: Vec::new(),
        target: None,
        seen: None,
    }
}

/// Sorted names of a directory (walk order must not depend on the file system's).
fn list(dir: &OwnedFd) -> Result<Vec<Vec<u8>>> {
    let fd = openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| "opening a directory".into())?;
    let mut names = Vec::new();
    let mut d = rustix::fs::Dir::read_from(&fd).ctx(|| "reading a directory".into())?;
    for ent in d.by_ref() {
        let ent = ent.ctx(|| "reading a directory".into())?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

fn open_dir(parent: &OwnedFd, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Walker<'_> {
    fn dir(&self, dir: &OwnedFd, rel: &[u8], depth: usize, out: &mut Vec<Entry>) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(StoreError::LimitExceeded(format!(
                "directory tree deeper than {MAX_DEPTH}"
            )));
        }
        let names = list(dir)?;
        // Stat every name, then store this directory's files in parallel, keeping walk order.
        let mut kinds = Vec::with_capacity(names.len());
        for name in names {
            match statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => kinds.push((name, st)),
                Err(rustix::io::Errno::NOENT) => {} // removed while we walk
                Err(e) => return Err(e).ctx(|| format!("stat {}", shown(&join(rel, &name)))),
            }
        }
        let files: Vec<Option<Entry>> = kinds
            .par_iter()
            .map(|(name, st)| {
                if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
                    self.file(dir, &join(rel, name), name)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<_>>()?;
        for ((name, st), file) in kinds.into_iter().zip(files) {
            let path = join(rel, &name);
            match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => {
                    if let Some(e) = file {
                        out.push(e);
                    }
                }
                FileType::Directory => {
                    let sub = match open_dir(dir, &name) {
                        Ok(fd) => fd,
                        // Removed or swapped for something else since the listing.
                        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => continue,
                        Err(rustix::io::Errno::LOOP) => continue,
                        Err(e) => return Err(e).ctx(|| format!("opening {}", shown(&path))),
                    };
                    let st = fstat(&sub).ctx(|| format!("stat {}", shown(&path)))?;
                    out.push(meta(path.clone(), Kind::Dir, &st));
                    self.dir(&sub, &path, depth + 1, out)?;
                }
                FileType::Symlink => {
                    let target = match readlinkat(dir, name.as_slice(), Vec::new()) {
                        Ok(t) => t.into_bytes(),
                        Err(rustix::io::Errno::NOENT | rustix::io::Errno::INVAL) => continue,
                        Err(e) => return Err(e).ctx(|| format!("readlink {}", shown(&path))),
                    };
                    let mut e = meta(path, Kind::Symlink, &st);
                    e.target = Some(Name(target));
                    out.push(e);
                }
                FileType::Fifo => out.push(meta(path, Kind::Fifo, &st)),
                _ => {
                    let mut s = self.skipped.lock().expect("skipped lock");
                    if s.len() < 100 {
                        s.push(shown(&path).escape_debug().collect());
                    }
                }
            }
        }
        Ok(())
    }

    fn file(&self, dir: &OwnedFd, path: &[u8], name: &[u8]) -> Result<Option<Entry>> {
        let ctx = || format!("reading {}", shown(path));
        let Some((mut f, st)) = (match open_regular(dir, name) {
            Ok(v) => v,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP) => None,
            Err(e) => return Err(e).ctx(ctx),
        }) else {
            return Ok(None);
        };
        let key = (st.st_nlink > 1).then_some((st.st_dev, st.st_ino));
        if let Some(key) = key {
            // Another name of an inode already stored: same chunks, no second read. Which name
            // stays the file and which become links is settled after the walk (`link_names`).
            let known = self.links.lock().expect("links lock").get(&key).cloned();
            if let Some((size, chunks)) = known {
                let mut e = meta(path.to_vec(), Kind::File, &st);
                e.seen = Some((st.st_ino, st.st_ctime, st.st_ctime_nsec as u32));
                e.size = size;
                e.chunks = chunks;
                self.linked
                    .lock()
                    .expect("linked lock")
                    .insert(path.to_vec(), key);
                return Ok(Some(e));
            }
        }
        let size = st.st_size as u64;
        let mut e = meta(path.to_vec(), Kind::File, &st);
        e.seen = Some((st.st_ino, st.st_ctime, st.st_ctime_nsec as u32));
        if let Some(prev) = self.previous.get(path) {
            if prev.kind == Kind::File
                && prev.size == size
                && prev.mtime == e.mtime
                && prev.seen == e.seen
                && prev
                    .chunks
                    .iter()
                    .all(|c| Digest::parse(&c.0).is_ok_and(|d| self.batch_has(&d)))
            {
                e.size = size;
                e.chunks = prev.chunks.clone();
                self.unchanged.fetch_add(1, Ordering::Relaxed);
                self.batch
                    .reused_chunks
                    .fetch_add(e.chunks.len() as u64, Ordering::Relaxed);
                self.batch
                    .reused_raw_bytes
                    .fetch_add(size, Ordering::Relaxed);
                self.advance(size);
                if let Some(key) = key {
                    self.linked
                        .lock()
                        .expect("linked lock")
                        .insert(path.to_vec(), key);
                }
                return Ok(Some(e));
            }
        }
        let (chunks, read) = self.chunk(&mut f).ctx(ctx)?;
        self.bytes_read.fetch_add(read, Ordering::Relaxed);
        // The file may have grown or shrunk while we read it: record what we stored.
        e.size = read;
        e.chunks = chunks;
        if let Some(key) = key {
            self.links
                .lock()
                .expect("links lock")
                .insert(key, (e.size, e.chunks.clone()));
            self.linked
                .lock()
                .expect("linked lock")
                .insert(path.to_vec(), key);
        }
        Ok(Some(e))
    }

    fn batch_has(&self, d: &Digest) -> bool {
        self.batch.store_ref().stored_size(d).is_some()
    }

    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(p) = self.progress {
            p(done);
        }
    }

    /// Reads a file segment by segment, cuts chunks with FastCDC, stores them in parallel.
    fn chunk(&self, f: &mut File) -> io::Result<(Vec<ChunkRef>, u64)> {
        // Segment buffers are reused: zeroing 16 MiB per small file was most of the CPU time.
        let mut buf = self
            .buffers
            .lock()
            .expect("buffers lock")
            .pop()
            .unwrap_or_else(|| vec![0u8; SEGMENT]);
        let out = self.chunk_into(f, &mut buf);
        self.buffers.lock().expect("buffers lock").push(buf);
        out
    }

    fn chunk_into(&self, f: &mut File, buf: &mut [u8]) -> io::Result<(Vec<ChunkRef>, u64)> {
        let mut filled = 0;
        let mut eof = false;
        let mut total = 0u64;
        let mut out = Vec::new();
        loop {
            if !eof {
                let n = read_full(f, &mut buf[filled..])?;
                eof = filled + n < SEGMENT;
                filled += n;
                total += n as u64;
            }
            let mut cuts = Vec::new();
            let mut start = 0;
            let cdc = FastCDC::new(&buf[..filled], MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
            while start < filled {
                let remaining = filled - start;
                // Without EOF the cut may lie beyond what is buffered: read more first.
                if !eof && remaining < MAX_CHUNK {
                    break;
                }
                let (_, end) = cdc.cut(start, remaining);
                cuts.push(start..end);
                start = end;
            }
            let refs: Vec<ChunkRef> = cuts
                .par_iter()
                .map(|r| {
                    let data = &buf[r.clone()];
                    let (d, put) = self.batch.put(data)?;
                    self.advance(data.len() as u64);
                    Ok(ChunkRef(
                        d.hex().to_string(),
                        data.len() as u64,
                        put.stored_len,
                    ))
                })
                .collect::<Result<_>>()
                .map_err(io::Error::from)?;
            out.extend(refs);
            buf.copy_within(start..filled, 0);
            filled -= start;
            if eof && filled == 0 {
                return Ok((out, total));
            }
        }
    }
}

/// Turns every name of a multiply-linked inode but the first (in manifest order) into a hard
/// link to that first name.
fn link_names(entries: &mut [Entry], linked: &HashMap<Vec<u8>, (u64, u64)>) {
    if linked.is_empty() {
        return;
    }
    let mut first: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for e in entries.iter_mut() {
        let Some(key) = linked.get(&e.path.0) else {
            continue;
        };
        match first.get(key) {
            Some(target) => {
                e.kind = Kind::Hardlink;
                e.target = Some(Name(target.clone()));
                e.size = 0;
                e.chunks = Vec::new();
                e.seen = None;
            }
            None => {
                first.insert(*key, e.path.0.clone());
            }
        }
    }
}

/// A previous manifest's files by path; a hard link stands for its target (same inode).
fn files_by_path(m: Manifest) -> HashMap<Vec<u8>, Entry> {
    let mut out: HashMap<Vec<u8>, Entry> = HashMap::new();
    for e in m.entries {
        match e.kind {
            Kind::File => {
                out.insert(e.path.0.clone(), e);
            }
            Kind::Hardlink => {
                let target = e.target.as_ref().and_then(|t| out.get(&t.0)).cloned();
                if let Some(mut t) = target {
                    t.path = e.path.clone();
                    out.insert(e.path.0.clone(), t);
                }
            }
            _ => {}
        }
    }
    out
}

impl ChunkStore {
    /// Backs up the directory `source`; with `previous` (a manifest digest of an earlier backup
    /// of the same tree) unchanged files are not read again. Writes the manifest last.
    pub fn backup(
        &self,
        source: &Path,
        previous: Option<&Digest>,
        progress: Option<Progress<'_>>,
    ) -> Result<BackupStats> {
        let previous = match previous {
            Some(d) => files_by_path(self.manifest(d)?),
            None => HashMap::new(),
        };
        let root = crate::unpack::open_path_dir(source)?;
        let root = openat(
            &root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx(|| format!("opening {}", source.display()))?;
        let st = fstat(root.as_fd()).ctx(|| format!("stat {}", source.display()))?;
        let w = Walker {
            batch: ChunkBatch::new(self),
            previous,
            links: Mutex::new(HashMap::new()),
            linked: Mutex::new(HashMap::new()),
            bytes_read: AtomicU64::new(0),
            done: AtomicU64::new(0),
            progress,
            skipped: Mutex::new(Vec::new()),
            unchanged: AtomicU64::new(0),
            buffers: Mutex::new(Vec::new()),
        };
        let mut entries = vec![meta(Vec::new(), Kind::Dir, &st)];
        let walked = w
            .dir(&root, b"", 1, &mut entries)
            .and_then(|()| w.batch.publish());
        if let Err(e) = walked {
            w.batch.abandon();
            return Err(e);
        }
        link_names(&mut entries, &w.linked.into_inner().expect("linked lock"));
        let mut totals = Totals {
            entries: entries.len() as u64,
            ..Totals::default()
        };
        for e in &entries {
            if e.kind == Kind::File {
                totals.files += 1;
                totals.bytes += e.size;
            }
        }
        let m = Manifest {
            version: VERSION,
            chunking: format!("fastcdc-2020 min={MIN_CHUNK} avg={AVG_CHUNK} max={MAX_CHUNK} zstd"),
            totals: totals.clone(),
            entries,
        };
        let digest = self.put_manifest(&m)?;
        let distinct = m.distinct_chunks();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(BackupStats {
            manifest: digest.to_string(),
            entries: totals.entries,
            files: totals.files,
            source_bytes: totals.bytes,
            bytes_read: g(&w.bytes_read),
            files_unchanged: g(&w.unchanged),
            chunks: m.entries.iter().map(|e| e.chunks.len() as u64).sum(),
            new_chunks: g(&w.batch.new_chunks),
            new_chunk_bytes: g(&w.batch.new_stored_bytes),
            new_raw_bytes: g(&w.batch.new_raw_bytes),
            reused_chunks: g(&w.batch.reused_chunks),
            distinct_chunks: distinct.len() as u64,
            stored_bytes: distinct.iter().map(|(_, _, s)| s).sum(),
            skipped: w.skipped.into_inner().expect("skipped lock"),
        })
    }
}
