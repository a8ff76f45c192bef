//! Exporting a backup as one `tar.zst` stream: bounded memory (a few chunks in flight), chunks
//! read, checked and decompressed on a second thread (in parallel) while the tar is built and
//! compressed on this one.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc::{sync_channel, Receiver};

use rayon::prelude::*;

use super::chunks::ChunkStore;
use super::manifest::{Entry, Kind, Manifest};
use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};

/// Chunks read ahead in one parallel batch.
const AHEAD: usize = 8;

/// Counts bytes written through it.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A file's bytes, pulled chunk by chunk from the read-ahead thread.
struct FileReader<'r> {
    rx: &'r Receiver<Result<Vec<u8>>>,
    chunks_left: usize,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.chunks_left == 0 {
                return Ok(0);
            }
            self.chunks_left -= 1;
            self.cur = self
                .rx
                .recv()
                .map_err(|_| io::Error::other("chunk reader stopped"))?
                .map_err(io::Error::from)?;
            self.pos = 0;
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn header(e: &Entry, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(e.mode);
    h.set_uid(e.uid as u64);
    h.set_gid(e.gid as u64);
    h.set_mtime(e.mtime.0.max(0) as u64);
    h.set_size(0);
    h
}

impl ChunkStore {
    /// Writes manifest `m` as a tar stream compressed with zstd at `level` to `out`; returns
    /// the compressed bytes written. Every chunk is checked against its digest on the way.
    pub fn export_tar<W: Write>(&self, m: &Manifest, out: W, level: i32) -> Result<u64> {
        m.validate(super::manifest::RestoreLimits::default())?;
        let (tx, rx) = sync_channel::<Result<Vec<u8>>>(AHEAD * 2);
        std::thread::scope(|s| {
            s.spawn(move || {
                let refs: Vec<(&str, u64)> = m
                    .entries
                    .iter()
                    .filter(|e| e.kind == Kind::File)
                    .flat_map(|e| e.chunks.iter().map(|c| (c.0.as_str(), c.1)))
                    .collect();
                for batch in refs.chunks(AHEAD) {
                    let read: Vec<Result<Vec<u8>>> = batch
                        .par_iter()
                        .map(|(hex, len)| self.read_chunk(&Digest::parse(hex)?, *len))
                        .collect();
                    for r in read {
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            return; // the writer gave up, or it will report this error
                        }
                    }
                }
            });
            let written = self.write_tar(m, &rx, out, level);
            drop(rx); // unblocks the reader if the writer failed
            written
        })
    }

    fn write_tar<W: Write>(
        &self,
        m: &Manifest,
        rx: &Receiver<Result<Vec<u8>>>,
        out: W,
        level: i32,
    ) -> Result<u64> {
        let enc = zstd::Encoder::new(Counting { inner: out, n: 0 }, level)
            .ctx(|| "starting zstd".into())?;
        let mut b = tar::Builder::new(enc);
        for e in &m.entries {
            let ctx = || format!("archiving {}", e.path.shown());
            let path = if e.path.0.is_empty() {
                b"./".to_vec()
            } else {
                e.path.0.clone()
            };
            let os = OsStr::from_bytes(&path);
            match e.kind {
                Kind::Dir => {
                    let mut p = path.clone();
                    if !p.ends_with(b"/") {
                        p.push(b'/');
                    }
                    let mut h = header(e, tar::EntryType::Directory);
                    b.append_data(&mut h, OsStr::from_bytes(&p), io::empty())
                        .ctx(ctx)?;
                }
                Kind::File => {
                    let mut h = header(e, tar::EntryType::Regular);
                    h.set_size(e.size);
                    let r = FileReader {
                        rx,
                        chunks_left: e.chunks.len(),
                        cur: Vec::new(),
                        pos: 0,
                    };
                    b.append_data(&mut h, os, r).ctx(ctx)?;
                }
                Kind::Symlink | Kind::Hardlink => {
                    let kind = if e.kind == Kind::Symlink {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    };
                    let mut h = header(e, kind);
                    let t = e.target.as_ref().expect("validated");
                    b.append_link(&mut h, os, OsStr::from_bytes(&t.0))
                        .ctx(ctx)?;
                }
                Kind::Fifo => {
                    let mut h = header(e, tar::EntryType::Fifo);
                    b.append_data(&mut h, os, io::empty()).ctx(ctx)?;
                }
            }
        }
        let enc = b.into_inner().ctx(|| "finishing the tar".into())?;
        let mut counting = enc.finish().ctx(|| "finishing zstd".into())?;
        counting.flush().ctx(|| "flushing the export".into())?;
        if counting.n == 0 {
            return Err(StoreError::Invalid("empty export".into()));
        }
        Ok(counting.n)
    }
}
