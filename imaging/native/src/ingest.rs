//! Ingesting blobs: write to `ingest/<random>`, hash while writing, verify, fsync, and rename
//! into `blobs/sha256/<hex>` without replacing an existing copy.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc;

use rustix::fs::{
    fchmod, fcntl_getfl, fcntl_setfl, fstat, futimens, openat, renameat_with, statat, AtFlags,
    FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps, CWD, UTIME_NOW, UTIME_OMIT,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::store::{random_name, rename_noreplace, sync_dir, Stats, Store, TempGuard};

/// The outcome of an ingest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ingested {
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// Bytes this call wrote to disk (0 when the blob was already present).
    pub written: u64,
}

/// An in-progress ingest; write chunks, then `commit`. Dropping it removes the partial file.
pub struct IngestWriter<'a> {
    store: &'a Store,
    file: File,
    guard: TempGuard,
    hasher: Sha256,
    count: u64,
    expected: Option<Digest>,
    expected_size: Option<u64>,
}

impl Store {
    /// Starts an ingest. `expected`/`expected_size` are checked at commit (the size also while
    /// writing, so an over-long stream stops early).
    pub fn begin_ingest(
        &self,
        expected: Option<Digest>,
        expected_size: Option<u64>,
    ) -> Result<IngestWriter<'_>> {
        let path = self.sub("ingest").join(random_name("blob-"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(rustix::fs::OFlags::CLOEXEC.bits() as i32)
            .open(&path)
            .ctx(|| format!("creating {}", path.display()))?;
        Ok(IngestWriter {
            store: self,
            file,
            guard: TempGuard::new(path),
            hasher: Sha256::new(),
            count: 0,
            expected,
            expected_size,
        })
    }

    /// If the caller already knows the digest and the blob is present, nothing needs reading.
    fn present(
        &self,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<Option<Ingested>> {
        let Some(d) = expected else { return Ok(None) };
        let path = self.blob_path(d);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {
                if let Some(want) = expected_size {
                    if want != m.len() {
                        return Err(StoreError::SizeMismatch {
                            expected: want,
                            actual: m.len(),
                        });
                    }
                }
                Stats::add(&self.stats.blobs_deduplicated, 1);
                Ok(Some(Ingested {
                    digest: d.clone(),
                    size: m.len(),
                    written: 0,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Ingests everything `reader` yields (see [`hash_pipeline`]: reading, hashing and writing
    /// run on three threads, so SHA-256 has a core to itself).
    pub fn ingest_reader<R: Read + Send>(
        &self,
        reader: R,
        expected: Option<Digest>,
        expected_size: Option<u64>,
    ) -> Result<Ingested> {
        if let Some(done) = self.present(expected.as_ref(), expected_size)? {
            return Ok(done);
        }
        let mut w = self.begin_ingest(expected, expected_size)?;
        let file = w.file.try_clone().ctx(|| "duplicating ingest fd".into())?;
        let sink = Sink::new(file, self.durable);
        let (hasher, count) = hash_pipeline(reader, Some(sink), expected_size)?;
        w.hasher = hasher;
        w.count = count;
        Stats::add(&self.stats.bytes_read, count);
        w.commit()
    }

    /// Ingests a file by path (short-circuits without reading if `expected` is present).
    pub fn ingest_path(
        &self,
        path: &Path,
        expected: Option<Digest>,
        expected_size: Option<u64>,
    ) -> Result<Ingested> {
        if let Some(done) = self.present(expected.as_ref(), expected_size)? {
            return Ok(done);
        }
        let f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Sequential).ok();
        self.ingest_reader(f, expected, expected_size)
    }

    /// Ingests a file the caller hands over: it is moved into `ingest/`, hashed where it lies and
    /// renamed into `blobs/`, so no byte is copied. A regular file is consumed whatever the
    /// outcome (on a mismatch it is removed like any failed ingest; a crash leaves it in
    /// `ingest/`, where gc collects temporaries); anything else (a symlink, a directory) is
    /// refused and left alone.
    ///
    /// The caller must no longer write to the file (no open writable descriptor, no writable
    /// mapping): those cannot be seen from here. What can be seen falls back to an ordinary
    /// copying ingest, which hashes exactly the bytes it writes: another filesystem, other hard
    /// links to the file, a file owned by another user. A size, mtime or ctime change while
    /// hashing fails the ingest.
    pub fn ingest_consume(
        &self,
        path: &Path,
        expected: Option<Digest>,
        expected_size: Option<u64>,
    ) -> Result<Ingested> {
        let shown = || path.display().to_string();
        let (file, st) = open_regular_file(path)?;
        if let Some(done) = self.present(expected.as_ref(), expected_size)? {
            remove_file_quiet(path);
            return Ok(done);
        }
        let tmp = self.sub("ingest").join(random_name("blob-"));
        match renameat_with(CWD, path, CWD, &tmp, RenameFlags::NOREPLACE) {
            Ok(()) => {}
            Err(Errno::XDEV) => {
                let r = self.ingest_reader(file, expected, expected_size);
                remove_file_quiet(path);
                return r;
            }
            Err(e) => return Err(e).ctx(|| format!("moving {} into the store", shown())),
        }
        let mut guard = TempGuard::new(tmp);
        // What was moved must be what was opened (and will be hashed), not a file swapped in.
        let moved = statat(CWD, guard.path(), AtFlags::SYMLINK_NOFOLLOW)
            .ctx(|| format!("inspecting {}", guard.path().display()))?;
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino) {
            return Err(StoreError::Invalid(format!(
                "{} changed while it was being ingested",
                shown()
            )));
        }
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential).ok();
        let ours = st.st_nlink == 1 && st.st_uid == rustix::process::geteuid().as_raw();
        // An ingest temp is judged by its mtime: make it young so gc leaves it alone meanwhile.
        let now = Timestamps {
            last_access: Timespec {
                tv_sec: 0,
                tv_nsec: UTIME_OMIT,
            },
            last_modification: Timespec {
                tv_sec: 0,
                tv_nsec: UTIME_NOW,
            },
        };
        if !ours
            || futimens(&file, &now).is_err()
            || fchmod(&file, Mode::from_raw_mode(0o644)).is_err()
        {
            // Someone else could write to it through another name or as its owner: copy.
            return self.ingest_reader(file, expected, expected_size);
        }
        let before = fstat(&file).ctx(|| format!("inspecting {}", shown()))?;
        let (hasher, count) = hash_pipeline(&file, None, expected_size)?;
        let after = fstat(&file).ctx(|| format!("inspecting {}", shown()))?;
        Stats::add(&self.stats.bytes_read, count);
        if !unchanged(&before, &after) || after.st_size as u64 != count {
            return Err(StoreError::Invalid(format!(
                "{} changed while it was being ingested",
                shown()
            )));
        }
        let digest = Digest::from_hasher(hasher);
        check(&digest, count, expected.as_ref(), expected_size)?;
        self.publish(&file, &mut guard, digest, count, 0)
    }

    /// Takes a file whose digest the caller computed over every byte it wrote into it (an upload
    /// it received itself): moved into `ingest/` and renamed into `blobs/` like
    /// [`Store::ingest_consume`], without reading it again. Only what can be checked without
    /// reading is checked: a regular file of exactly `size` bytes with one link, owned by this
    /// user (else it falls back to a copying ingest, which hashes what it copies). The caller
    /// vouches that nothing else wrote to it; use `ingest_consume` when in doubt.
    pub fn ingest_hashed(&self, path: &Path, digest: Digest, size: u64) -> Result<Ingested> {
        let shown = || path.display().to_string();
        let (file, st) = open_regular_file(path)?;
        let ours = st.st_nlink == 1 && st.st_uid == rustix::process::geteuid().as_raw();
        if !ours {
            let r = self.ingest_reader(file, Some(digest), Some(size));
            remove_file_quiet(path);
            return r;
        }
        if st.st_size as u64 != size {
            remove_file_quiet(path);
            return Err(StoreError::SizeMismatch {
                expected: size,
                actual: st.st_size as u64,
            });
        }
        if let Some(done) = self.present(Some(&digest), Some(size))? {
            remove_file_quiet(path);
            return Ok(done);
        }
        let tmp = self.sub("ingest").join(random_name("blob-"));
        match renameat_with(CWD, path, CWD, &tmp, RenameFlags::NOREPLACE) {
            Ok(()) => {}
            Err(Errno::XDEV) => {
                let r = self.ingest_reader(file, Some(digest), Some(size));
                remove_file_quiet(path);
                return r;
            }
            Err(e) => return Err(e).ctx(|| format!("moving {} into the store", shown())),
        }
        let mut guard = TempGuard::new(tmp);
        let moved = statat(CWD, guard.path(), AtFlags::SYMLINK_NOFOLLOW)
            .ctx(|| format!("inspecting {}", guard.path().display()))?;
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino) || moved.st_size as u64 != size {
            return Err(StoreError::Invalid(format!(
                "{} changed while it was being ingested",
                shown()
            )));
        }
        if fchmod(&file, Mode::from_raw_mode(0o644)).is_err() {
            return self.ingest_reader(file, Some(digest), Some(size));
        }
        self.publish(&file, &mut guard, digest, size, 0)
    }

    /// Moves a verified temp file into `blobs/` (fsyncing it first in a durable store); if the
    /// blob is already there, the temp is dropped. `wrote` is what this ingest wrote itself.
    fn publish(
        &self,
        file: &File,
        guard: &mut TempGuard,
        digest: Digest,
        size: u64,
        wrote: u64,
    ) -> Result<Ingested> {
        let dest = self.blob_path(&digest);
        let done = Ingested {
            digest,
            size,
            written: wrote,
        };
        Stats::add(&self.stats.bytes_written, wrote);
        if dest.is_file() {
            Stats::add(&self.stats.blobs_deduplicated, 1);
            return Ok(done);
        }
        if self.durable {
            file.sync_all()
                .ctx(|| format!("syncing {}", guard.path().display()))?;
        }
        if rename_noreplace(guard.path(), &dest)? {
            guard.disarm();
            if self.durable {
                sync_dir(dest.parent().expect("blob has a parent"))?;
            }
            Stats::add(&self.stats.blobs_written, 1);
        } else {
            Stats::add(&self.stats.blobs_deduplicated, 1);
        }
        Ok(done)
    }
}

/// Whether a consumed file kept its identity, size and times while it was hashed.
fn unchanged(a: &rustix::fs::Stat, b: &rustix::fs::Stat) -> bool {
    a.st_ino == b.st_ino
        && a.st_size == b.st_size
        && a.st_mtime == b.st_mtime
        && a.st_mtime_nsec == b.st_mtime_nsec
        && a.st_ctime == b.st_ctime
        && a.st_ctime_nsec == b.st_ctime_nsec
}

fn remove_file_quiet(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Compares what was hashed with what the caller promised.
fn check(
    digest: &Digest,
    count: u64,
    expected: Option<&Digest>,
    expected_size: Option<u64>,
) -> Result<()> {
    if let Some(want) = expected_size {
        if want != count {
            return Err(StoreError::SizeMismatch {
                expected: want,
                actual: count,
            });
        }
    }
    if let Some(want) = expected {
        if want != digest {
            return Err(StoreError::DigestMismatch {
                expected: want.to_string(),
                actual: digest.to_string(),
            });
        }
    }
    Ok(())
}

/// Bytes per buffer passed between the pipeline's threads, and buffers in flight.
const CHUNK: usize = 4 << 20;
const BUFFERS: usize = 4;
/// O_DIRECT wants buffers, lengths and file offsets aligned to the logical block size; a page
/// covers every block device in use.
const ALIGN: usize = 4096;
/// Buffered writes start writeback every this many bytes, so the final fsync is short.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// A page-aligned buffer (O_DIRECT wants aligned memory), passed between the threads.
struct Chunk {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl Chunk {
    fn new() -> Self {
        let mem = vec![0u8; CHUNK + ALIGN];
        let off = mem.as_ptr().align_offset(ALIGN);
        Chunk { mem, off, len: 0 }
    }

    fn space(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + CHUNK]
    }

    fn data(&self) -> &[u8] {
        &self.mem[self.off..self.off + self.len]
    }
}

/// Where the pipeline writes what it hashed.
struct Sink {
    file: File,
    /// Write with O_DIRECT: the data goes from our buffer to the device without a page cache
    /// copy. Used when the blob must reach the disk before it is published anyway (a durable
    /// store); falls back to buffered writes where the filesystem refuses it.
    direct: bool,
    /// Bytes written so far (the file offset).
    pos: u64,
    since_writeback: u64,
}

impl Sink {
    fn new(file: File, durable: bool) -> Self {
        let direct = durable && set_direct(&file, true);
        Sink {
            file,
            direct,
            pos: 0,
            since_writeback: 0,
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.direct && !data.len().is_multiple_of(ALIGN) {
            // The short last chunk: O_DIRECT cannot write it.
            self.buffered();
        }
        let mut data = data;
        if self.direct {
            match self.file.write_all(data) {
                Ok(()) => {
                    self.pos += data.len() as u64;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The filesystem took the flag but not the write: go on buffered from
                    // wherever the direct writes stopped.
                    self.buffered();
                    let done = self.file.stream_position()? - self.pos;
                    data = &data[done as usize..];
                    self.pos += done;
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all(data)?;
        self.pos += data.len() as u64;
        self.since_writeback += data.len() as u64;
        if self.since_writeback >= WRITEBACK_EVERY {
            start_writeback(&self.file);
            self.since_writeback = 0;
        }
        Ok(())
    }

    fn buffered(&mut self) {
        set_direct(&self.file, false);
        self.direct = false;
    }
}

/// Turns O_DIRECT on or off; false if the filesystem refuses it.
fn set_direct(file: &File, on: bool) -> bool {
    let Ok(fl) = fcntl_getfl(file) else {
        return false;
    };
    let fl = if on {
        fl | OFlags::DIRECT
    } else {
        fl - OFlags::DIRECT
    };
    fcntl_setfl(file, fl).is_ok()
}

/// Hashes everything `reader` yields and, with a `sink`, writes those very buffers to it.
///
/// Three threads: one reads into a ring of buffers, the calling thread hashes each buffer, and
/// one writes the hashed buffers out and hands them back to the reader. SHA-256 is the
/// slowest stage, so it gets a core of its own while the copies out of and into the kernel
/// run on the other one. What is written is exactly what was hashed (the same memory), so a
/// source that changes underneath cannot make the blob differ from its digest.
fn hash_pipeline<R: Read + Send>(
    mut reader: R,
    sink: Option<Sink>,
    limit: Option<u64>,
) -> Result<(Sha256, u64)> {
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Chunk>(BUFFERS);
    let (full_tx, full_rx) = mpsc::sync_channel::<Chunk>(BUFFERS);
    let (hashed_tx, hashed_rx) = mpsc::sync_channel::<Chunk>(BUFFERS);
    for _ in 0..BUFFERS {
        empty_tx.send(Chunk::new()).expect("channel open");
    }
    std::thread::scope(|s| {
        let read = s.spawn(move || -> io::Result<()> {
            // A closed channel means a later stage stopped; its error is the one reported.
            while let Ok(mut buf) = empty_rx.recv() {
                let n = read_full(&mut reader, buf.space())?;
                if n == 0 {
                    break;
                }
                buf.len = n;
                if full_tx.send(buf).is_err() || n < CHUNK {
                    break;
                }
            }
            Ok(())
        });
        let write = sink.map(|mut sink| {
            let back = empty_tx.clone();
            s.spawn(move || -> io::Result<u64> {
                let mut written = 0u64;
                for buf in hashed_rx {
                    sink.write(buf.data())?;
                    written += buf.len as u64;
                    let _ = back.send(buf);
                }
                Ok(written)
            })
        });
        // Without a writer the hasher recycles buffers itself. With one, no other sender may
        // outlive it, or the reader would wait forever after a write error.
        let back = match write {
            Some(_) => {
                drop(empty_tx);
                None
            }
            None => Some(empty_tx),
        };
        let hashed = (move || -> Result<(Sha256, u64)> {
            let mut hasher = Sha256::new();
            let mut count = 0u64;
            for buf in full_rx {
                hasher.update(buf.data());
                count += buf.len as u64;
                if let Some(want) = limit {
                    if count > want {
                        return Err(StoreError::SizeMismatch {
                            expected: want,
                            actual: count,
                        });
                    }
                }
                let sent = match &back {
                    Some(tx) => tx.send(buf).is_ok(),
                    None => hashed_tx.send(buf).is_ok(),
                };
                if !sent && back.is_none() {
                    return Err(StoreError::Invalid("ingest writer stopped early".into()));
                }
            }
            Ok((hasher, count))
        })();
        let read = read
            .join()
            .map_err(|_| StoreError::Invalid("ingest reader panicked".into()))?;
        let written = match write {
            Some(w) => Some(
                w.join()
                    .map_err(|_| StoreError::Invalid("ingest writer panicked".into()))?,
            ),
            None => None,
        };
        read.ctx(|| "reading blob".into())?;
        let written = written.transpose().ctx(|| "writing blob".into())?;
        let (hasher, count) = hashed?;
        if let Some(w) = written {
            if w != count {
                return Err(StoreError::Invalid("ingest writer stopped early".into()));
            }
        }
        Ok((hasher, count))
    })
}

/// Queues writeback of what is dirty in `file` without waiting (a later fsync then finds little
/// left to write).
pub fn start_writeback_fd(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a descriptor the caller keeps open; no memory is passed.
    unsafe {
        libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // Best effort: queue writeback of what is dirty so far without waiting for it.
    // SAFETY: plain syscall on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Reads until `buf` is full or EOF; returns bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl IngestWriter<'_> {
    /// Appends a chunk, hashing it.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<()> {
        self.count += data.len() as u64;
        Stats::add(&self.store.stats.bytes_read, data.len() as u64);
        if let Some(want) = self.expected_size {
            if self.count > want {
                return Err(StoreError::SizeMismatch {
                    expected: want,
                    actual: self.count,
                });
            }
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .ctx(|| format!("writing {}", self.guard.path().display()))
    }

    /// Verifies digest and size, fsyncs, and moves the blob into place. If another writer got
    /// there first, the blob is already present and this copy is discarded.
    pub fn commit(mut self) -> Result<Ingested> {
        let digest = Digest::from_hasher(std::mem::take(&mut self.hasher));
        check(
            &digest,
            self.count,
            self.expected.as_ref(),
            self.expected_size,
        )?;
        self.store
            .publish(&self.file, &mut self.guard, digest, self.count, self.count)
    }
}

impl Write for IngestWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_chunk(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The caller's file at `path`, opened read-only without following a symlink, and its status; an
/// error unless it is a regular file.
fn open_regular_file(path: &Path) -> Result<(File, rustix::fs::Stat)> {
    let shown = || path.display().to_string();
    let file = openat(
        CWD,
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map(File::from)
    .map_err(|e| match e {
        Errno::LOOP => StoreError::Invalid(format!("{} is a symlink", shown())),
        e => StoreError::Io {
            context: format!("opening {}", shown()),
            source: e.into(),
        },
    })?;
    let st = fstat(&file).ctx(|| format!("inspecting {}", shown()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(StoreError::Invalid(format!(
            "{} is not a regular file",
            shown()
        )));
    }
    Ok((file, st))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Limits, Policy};
    use std::os::unix::fs::MetadataExt;

    fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(random_name("bulkhead-ingest-test-"));
        (
            Store::open(&dir, Policy::default(), Limits::default()).unwrap(),
            dir,
        )
    }

    #[test]
    fn ingests_and_deduplicates() {
        let (s, dir) = store();
        let data = vec![7u8; 10_000_000];
        let a = s
            .ingest_reader(&data[..], None, Some(data.len() as u64))
            .unwrap();
        assert_eq!(a.digest, Digest::of(&data));
        assert!(s.has_blob(&a.digest));
        let b = s
            .ingest_reader(&data[..], Some(a.digest.clone()), None)
            .unwrap();
        assert_eq!(b.written, 0);
        assert_eq!(std::fs::read_dir(dir.join("ingest")).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn ingest_temps(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("ingest")).unwrap().count()
    }

    #[test]
    fn odd_sizes_round_trip_through_the_pipeline() {
        // Around the chunk size and the O_DIRECT alignment, in durable and scratch stores.
        for durable in [true, false] {
            let (mut s, dir) = store();
            s.durable = durable;
            for len in [
                0,
                1,
                4095,
                4096,
                CHUNK - 1,
                CHUNK,
                CHUNK + 1,
                3 * CHUNK + 4097,
            ] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
                let got = s.ingest_reader(&data[..], None, Some(len as u64)).unwrap();
                assert_eq!(got.digest, Digest::of(&data), "{len}");
                assert_eq!(std::fs::read(s.blob_path(&got.digest)).unwrap(), data);
            }
            assert_eq!(ingest_temps(&dir), 0);
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_read_error_fails_the_ingest_and_leaves_nothing() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(1);
                self.0 -= n;
                Ok(n)
            }
        }
        let (s, dir) = store();
        let err = s.ingest_reader(Failing(CHUNK * 2 + 5), None, None);
        assert!(matches!(err, Err(StoreError::Io { .. })), "{err:?}");
        assert_eq!(ingest_temps(&dir), 0);
        assert_eq!(
            std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count(),
            0
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn consume_moves_the_file_without_copying() {
        let (s, dir) = store();
        let src = dir.join("upload");
        let data = vec![3u8; 5 << 20];
        std::fs::write(&src, &data).unwrap();
        let ino = std::fs::metadata(&src).unwrap().ino();
        let got = s
            .ingest_consume(&src, Some(Digest::of(&data)), Some(data.len() as u64))
            .unwrap();
        assert_eq!(got.written, 0);
        assert!(!src.exists());
        let blob = s.blob_path(&got.digest);
        assert_eq!(std::fs::metadata(&blob).unwrap().ino(), ino);
        assert_eq!(std::fs::read(&blob).unwrap(), data);
        assert_eq!(ingest_temps(&dir), 0);
        // Present already: the file is still taken, nothing is read.
        std::fs::write(&src, &data).unwrap();
        let again = s
            .ingest_consume(&src, Some(got.digest.clone()), None)
            .unwrap();
        assert_eq!(again.written, 0);
        assert!(!src.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn hashed_moves_the_file_and_checks_its_size() {
        let (s, dir) = store();
        let data = b"hashed by the one who wrote it".to_vec();
        let src = dir.join("ingest").join("upload-a");
        std::fs::write(&src, &data).unwrap();
        let got = s
            .ingest_hashed(&src, Digest::of(&data), data.len() as u64)
            .unwrap();
        assert_eq!(std::fs::read(s.blob_path(&got.digest)).unwrap(), data);
        assert!(!src.exists());
        let short = dir.join("ingest").join("upload-b");
        std::fs::write(&short, b"abc").unwrap();
        let err = s.ingest_hashed(&short, Digest::of(b"abcd"), 4).unwrap_err();
        assert!(matches!(err, StoreError::SizeMismatch { .. }));
        assert!(!short.exists());
        assert!(!s.blob_path(&Digest::of(b"abcd")).exists());
    }

    #[test]
    fn consume_of_a_wrong_file_leaves_nothing() {
        let (s, dir) = store();
        let src = dir.join("upload");
        std::fs::write(&src, b"data").unwrap();
        let err = s
            .ingest_consume(&src, Some(Digest::of(b"other")), None)
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        std::fs::write(&src, b"data").unwrap();
        let err = s.ingest_consume(&src, None, Some(3)).unwrap_err();
        assert!(matches!(err, StoreError::SizeMismatch { .. }));
        assert!(!src.exists());
        assert_eq!(ingest_temps(&dir), 0);
        assert_eq!(
            std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count(),
            0
        );
        // A missing file is an error that leaves nothing either.
        assert!(matches!(
            s.ingest_consume(&src, None, None),
            Err(StoreError::Io { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn consume_copies_a_file_someone_else_can_reach() {
        let (s, dir) = store();
        let src = dir.join("upload");
        let other = dir.join("other-name");
        std::fs::write(&src, b"shared").unwrap();
        std::fs::hard_link(&src, &other).unwrap();
        let got = s.ingest_consume(&src, None, None).unwrap();
        assert_eq!(got.written, 6);
        let blob = s.blob_path(&got.digest);
        // The blob is a copy: writing through the other name cannot change it.
        assert_ne!(
            std::fs::metadata(&blob).unwrap().ino(),
            std::fs::metadata(&other).unwrap().ino()
        );
        assert!(!src.exists());
        assert_eq!(ingest_temps(&dir), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn consume_refuses_what_is_not_a_regular_file() {
        let (s, dir) = store();
        let target = dir.join("target");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = s.ingest_consume(&link, None, None).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
        assert_eq!(std::fs::read(&link).unwrap(), b"keep me");
        // Nor is a directory moved (let alone removed).
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("f"), b"x").unwrap();
        let err = s.ingest_consume(&sub, None, None).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
        assert!(sub.join("f").is_file());
        assert_eq!(ingest_temps(&dir), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn mismatch_leaves_nothing() {
        let (s, dir) = store();
        let wrong = Digest::of(b"other");
        let err = s
            .ingest_reader(&b"data"[..], Some(wrong), None)
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        let err = s.ingest_reader(&b"data"[..], None, Some(3)).unwrap_err();
        assert!(matches!(err, StoreError::SizeMismatch { .. }));
        assert_eq!(std::fs::read_dir(dir.join("ingest")).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count(),
            0
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
