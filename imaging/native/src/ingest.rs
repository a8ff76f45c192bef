//! Ingesting blobs: write to `ingest/<random>`, hash while writing, verify, fsync, and rename
//! into `blobs/sha256/<hex>` without replacing an existing copy.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc;

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

const CHUNK: usize = 4 << 20;

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

    /// Ingests everything `reader` yields. Reading+hashing and writing run on two threads so the
    /// disk and SHA-256 overlap.
    pub fn ingest_reader<R: Read + Send>(
        &self,
        mut reader: R,
        expected: Option<Digest>,
        expected_size: Option<u64>,
    ) -> Result<Ingested> {
        if let Some(done) = self.present(expected.as_ref(), expected_size)? {
            return Ok(done);
        }
        let mut w = self.begin_ingest(expected, expected_size)?;
        let file = w.file.try_clone().ctx(|| "duplicating ingest fd".into())?;
        let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(3);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(4);
        for _ in 0..4 {
            empty_tx.send(vec![0u8; CHUNK]).expect("channel open");
        }
        let limit = expected_size;
        let read_result: Result<(Sha256, u64)> = std::thread::scope(|s| {
            let writer = s.spawn(move || -> io::Result<u64> {
                let mut file = file;
                let mut written = 0u64;
                let mut since_flush = 0u64;
                for buf in full_rx {
                    file.write_all(&buf)?;
                    written += buf.len() as u64;
                    since_flush += buf.len() as u64;
                    // Start writeback early so the final fsync has little left to do.
                    if since_flush >= 64 << 20 {
                        start_writeback(&file);
                        since_flush = 0;
                    }
                    if empty_tx.send(buf).is_err() {
                        break;
                    }
                }
                Ok(written)
            });
            let mut hasher = Sha256::new();
            let mut count = 0u64;
            let outcome = (|| -> Result<()> {
                loop {
                    let mut buf = empty_rx.recv().map_err(|_| writer_gone())?;
                    buf.resize(CHUNK, 0);
                    let n = read_full(&mut reader, &mut buf).ctx(|| "reading blob".into())?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.truncate(n);
                    hasher.update(&buf);
                    count += n as u64;
                    if let Some(want) = limit {
                        if count > want {
                            return Err(StoreError::SizeMismatch {
                                expected: want,
                                actual: count,
                            });
                        }
                    }
                    full_tx.send(buf).map_err(|_| writer_gone())?;
                }
            })();
            drop(full_tx);
            let written = writer
                .join()
                .map_err(|_| StoreError::Invalid("ingest writer panicked".into()))?
                .ctx(|| "writing blob".into())?;
            outcome?;
            debug_assert_eq!(written, count);
            Ok((hasher, count))
        });
        let (hasher, count) = read_result?;
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
}

fn writer_gone() -> StoreError {
    StoreError::Invalid("ingest writer stopped early".into())
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
        if let Some(want) = self.expected_size {
            if want != self.count {
                return Err(StoreError::SizeMismatch {
                    expected: want,
                    actual: self.count,
                });
            }
        }
        if let Some(want) = &self.expected {
            if *want != digest {
                return Err(StoreError::DigestMismatch {
                    expected: want.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let store = self.store;
        let dest = store.blob_path(&digest);
        if dest.is_file() {
            Stats::add(&store.stats.blobs_deduplicated, 1);
            Stats::add(&store.stats.bytes_written, self.count);
            return Ok(Ingested {
                digest,
                size: self.count,
                written: self.count,
            });
        }
        if store.durable {
            self.file
                .sync_all()
                .ctx(|| format!("syncing {}", self.guard.path().display()))?;
        }
        Stats::add(&store.stats.bytes_written, self.count);
        if rename_noreplace(self.guard.path(), &dest)? {
            self.guard.disarm();
            if store.durable {
                sync_dir(dest.parent().expect("blob has a parent"))?;
            }
            Stats::add(&store.stats.blobs_written, 1);
        } else {
            Stats::add(&store.stats.blobs_deduplicated, 1);
        }
        Ok(Ingested {
            digest,
            size: self.count,
            written: self.count,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Limits, Policy};

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
