//! Reading an overlayfs upper dir: the list of changes against the lower layers, and an OCI layer
//! tar of it (whiteout devices become `.wh.NAME`, opaque dirs get `.wh..wh..opq`).
//!
//! The upper dir belongs to a tenant's container and may change while we read it, so the walk is
//! descriptor-based and never follows a symlink: a directory swapped for a symlink mid-walk cannot
//! pull host files into the layer.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{openat, readlinkat, statat, AtFlags, FileType, Mode, OFlags, Stat};

use crate::digest::{Digest, HashingWriter};
use crate::error::{IoContext, Result, StoreError};
use crate::flatten::{xattr_names, xattr_value};
use crate::ingest::Ingested;
use crate::safepath::{open_child_dir, open_regular, ResolveError};
use crate::store::{Store, MAX_DEPTH};
use crate::unpack::{open_path_dir, Compression};

/// A change in an upper dir relative to its lowers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Changed,
    Deleted,
}

impl ChangeKind {
    /// "A", "C" or "D", as `docker diff` prints them.
    pub fn letter(self) -> &'static str {
        match self {
            ChangeKind::Added => "A",
            ChangeKind::Changed => "C",
            ChangeKind::Deleted => "D",
        }
    }
}

/// Host ids of a user-namespaced container's upper dir: `host_base..host_base+size` are the ids
/// 0..size seen inside. Committing subtracts the base, so the layer holds the ids the container saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdShift {
    pub host_base: u32,
    pub size: u32,
}

/// The id a layer gets for a host id of the upper dir.
fn unshifted(id: u32, shift: Option<IdShift>) -> u64 {
    match shift {
        None => id as u64,
        Some(s) if id >= s.host_base && id - s.host_base < s.size => (id - s.host_base) as u64,
        // Not an id the container could give (the host's, or outside its range): nobody.
        Some(_) => NOBODY,
    }
}

const NOBODY: u64 = 65534;

/// The result of committing an upper dir.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The compressed blob now in the store.
    pub blob: Ingested,
    /// SHA-256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
}

const RD_DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn open_rd(dir: &OwnedFd, name: &[u8]) -> Result<OwnedFd> {
    openat(dir, name, RD_DIR, Mode::empty())
        .ctx(|| format!("opening {}", String::from_utf8_lossy(name)))
}

fn list(dir: &OwnedFd) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let d = rustix::fs::Dir::read_from(dir).ctx(|| "reading directory".into())?;
    for ent in d {
        let ent = ent.ctx(|| "reading directory".into())?;
        let name = ent.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
    out.sort();
    Ok(out)
}

fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn is_opaque(fd: &OwnedFd) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|k| matches!(xattr_value(fd.as_fd(), k.as_bytes()), Ok(v) if v == b"y"))
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = rel.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Lists the changes in `upper` against `lowers` (bottom first), sorted by path.
pub fn changes(upper: &Path, lowers: &[impl AsRef<Path>]) -> Result<Vec<(ChangeKind, String)>> {
    let root = open_rd(&open_path_dir(upper)?, b".")?;
    let lower_roots = lowers
        .iter()
        .rev()
        .map(|l| open_path_dir(l.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    walk_changes(&root, &[], &lower_roots, &mut out, 0)?;
    Ok(out)
}

fn walk_changes(
    dir: &OwnedFd,
    rel: &[u8],
    lowers: &[OwnedFd],
    out: &mut Vec<(ChangeKind, String)>,
    depth: usize,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(StoreError::LimitExceeded(format!(
            "upper dir deeper than {MAX_DEPTH}"
        )));
    }
    for name in list(dir)? {
        let path = join(rel, &name);
        let shown = format!("/{}", String::from_utf8_lossy(&path));
        let st = match statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue, // removed while we looked
            Err(e) => return Err(e).ctx(|| format!("stat {shown}")),
        };
        if is_whiteout(&st) {
            out.push((ChangeKind::Deleted, shown));
            continue;
        }
        let existed = exists_in_lowers(lowers, &path);
        out.push((
            if existed {
                ChangeKind::Changed
            } else {
                ChangeKind::Added
            },
            shown,
        ));
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let sub = open_rd(dir, &name)?;
            walk_changes(&sub, &path, lowers, out, depth + 1)?;
        }
    }
    Ok(())
}

/// Whether `path` is visible in the merged view of `lowers` (top first).
fn exists_in_lowers(lowers: &[OwnedFd], path: &[u8]) -> bool {
    let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let Some((name, parents)) = comps.split_last() else {
        return true;
    };
    for lower in lowers {
        let Ok(mut cur) = open_rd(lower, b".") else {
            continue;
        };
        let mut hidden_below = false;
        let mut reached = true;
        for comp in parents {
            match statat(&cur, *comp, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if is_whiteout(&st) => return false,
                Ok(_) => {}
                Err(_) => {
                    reached = false;
                    break;
                }
            }
            match open_child_dir(&cur, comp, false) {
                Ok(next) => cur = open_rd(&next, b".").unwrap_or(next),
                // A non-directory here hides the path in this layer and all below it.
                Err(ResolveError::Symlink) | Err(ResolveError::NotDir) => return false,
                Err(_) => {
                    reached = false;
                    break;
                }
            }
            hidden_below |= is_opaque(&cur);
        }
        if reached {
            match statat(&cur, *name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => return !is_whiteout(&st),
                Err(_) if hidden_below => return false,
                Err(_) => {}
            }
        }
    }
    false
}

impl Store {
    /// Writes `upper` as a compressed OCI layer into the store.
    pub fn diff_upper(
        &self,
        upper: &Path,
        compression: Compression,
        id_shift: Option<IdShift>,
    ) -> Result<Committed> {
        let root = open_rd(&open_path_dir(upper)?, b".")?;
        let ingest = BufWriter::with_capacity(1 << 20, self.begin_ingest(None, None)?);
        let enc = match compression {
            Compression::Gzip => Enc::Gzip(flate2::write::GzEncoder::new(
                ingest,
                flate2::Compression::new(3),
            )),
            Compression::Zstd => Enc::Zstd(
                zstd::stream::write::Encoder::new(ingest, 3).ctx(|| "starting zstd".into())?,
            ),
            Compression::None => Enc::Plain(ingest),
        };
        let mut b = tar::Builder::new(HashingWriter::new(enc));
        let mut w = TarWalk {
            builder: &mut b,
            links: HashMap::new(),
            id_shift,
        };
        w.dir(&root, &[], 0)?;
        let hashing = b.into_inner().ctx(|| "finishing tar".into())?;
        let (enc, diff_id, tar_size) = hashing.finish();
        let ingest = enc.finish().ctx(|| "finishing compression".into())?;
        let writer = ingest.into_inner().map_err(|e| StoreError::Io {
            context: "flushing layer".into(),
            source: e.into_error(),
        })?;
        let blob = writer.commit()?;
        Ok(Committed {
            blob,
            diff_id,
            tar_size,
        })
    }
}

/// The compressor in front of the ingest file.
enum Enc<W: Write> {
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Plain(W),
}

impl<W: Write> Enc<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Enc::Gzip(e) => e.finish(),
            Enc::Zstd(e) => e.finish(),
            Enc::Plain(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Enc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Enc::Gzip(e) => e.write(buf),
            Enc::Zstd(e) => e.write(buf),
            Enc::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Enc::Gzip(e) => e.flush(),
            Enc::Zstd(e) => e.flush(),
            Enc::Plain(w) => w.flush(),
        }
    }
}

struct TarWalk<'b, W: Write> {
    builder: &'b mut tar::Builder<W>,
    links: HashMap<(u64, u64), Vec<u8>>,
    id_shift: Option<IdShift>,
}

fn header_for(st: &Stat, kind: tar::EntryType, shift: Option<IdShift>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(unshifted(st.st_uid, shift));
    h.set_gid(unshifted(st.st_gid, shift));
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(0);
    h
}

impl<W: Write> TarWalk<'_, W> {
    fn xattrs(&mut self, fd: &OwnedFd) -> Result<()> {
        let mut recs: Vec<(String, Vec<u8>)> = Vec::new();
        for name in xattr_names(fd.as_fd())? {
            if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
                continue;
            }
            let value = xattr_value(fd.as_fd(), &name)?;
            recs.push((
                format!("SCHILY.xattr.{}", String::from_utf8_lossy(&name)),
                value,
            ));
        }
        if !recs.is_empty() {
            self.builder
                .append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .ctx(|| "writing PAX header".into())?;
        }
        Ok(())
    }

    fn empty_file(&mut self, path: &[u8]) -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        self.builder
            .append_data(&mut h, OsStr::from_bytes(path), io::empty())
            .ctx(|| "writing whiteout".into())
    }

    fn dir(&mut self, dir: &OwnedFd, rel: &[u8], depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(StoreError::LimitExceeded(format!(
                "upper dir deeper than {MAX_DEPTH}"
            )));
        }
        for name in list(dir)? {
            let path = join(rel, &name);
            let os = OsStr::from_bytes(&path);
            let st = match statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(e).ctx(|| format!("stat {}", os.to_string_lossy())),
            };
            let ctx = || format!("archiving {}", os.to_string_lossy());
            match FileType::from_raw_mode(st.st_mode) {
                FileType::CharacterDevice if st.st_rdev == 0 => {
                    let mut wh = rel.to_vec();
                    if !wh.is_empty() {
                        wh.push(b'/');
                    }
                    wh.extend_from_slice(b".wh.");
                    wh.extend_from_slice(&name);
                    self.empty_file(&wh)?;
                }
                FileType::Directory => {
                    let sub = open_rd(dir, &name)?;
                    let st = rustix::fs::fstat(&sub).ctx(ctx)?;
                    self.xattrs(&sub)?;
                    let mut h = header_for(&st, tar::EntryType::Directory, self.id_shift);
                    let mut dpath = path.clone();
                    dpath.push(b'/');
                    self.builder
                        .append_data(&mut h, OsStr::from_bytes(&dpath), io::empty())
                        .ctx(ctx)?;
                    if is_opaque(&sub) {
                        self.empty_file(&join(&path, b".wh..wh..opq"))?;
                    }
                    self.dir(&sub, &path, depth + 1)?;
                }
                FileType::RegularFile => {
                    // The workload may swap a FIFO in since the listing: its open would block the
                    // commit for good. Only a file still regular once pinned is opened for real.
                    let (fd, st) = match open_regular(dir, name.as_slice()) {
                        Ok(Some((file, st))) => (OwnedFd::from(file), st),
                        Ok(None) | Err(rustix::io::Errno::NOENT) => continue, // swapped while we looked
                        Err(e) => return Err(e).ctx(ctx),
                    };
                    let key = (st.st_dev, st.st_ino);
                    if st.st_nlink > 1 {
                        if let Some(first) = self.links.get(&key) {
                            let mut h = header_for(&st, tar::EntryType::Link, self.id_shift);
                            let first = first.clone();
                            self.builder
                                .append_link(&mut h, os, OsStr::from_bytes(&first))
                                .ctx(ctx)?;
                            continue;
                        }
                        self.links.insert(key, path.clone());
                    }
                    self.xattrs(&fd)?;
                    let mut h = header_for(&st, tar::EntryType::Regular, self.id_shift);
                    let size = st.st_size as u64;
                    h.set_size(size);
                    let mut reader = ExactReader {
                        inner: std::fs::File::from(fd).take(size),
                        left: size,
                    };
                    self.builder.append_data(&mut h, os, &mut reader).ctx(ctx)?;
                }
                FileType::Symlink => {
                    let target = readlinkat(dir, name.as_slice(), Vec::new()).ctx(ctx)?;
                    let mut h = header_for(&st, tar::EntryType::Symlink, self.id_shift);
                    self.builder
                        .append_link(&mut h, os, OsStr::from_bytes(target.as_bytes()))
                        .ctx(ctx)?;
                }
                ft @ (FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo) => {
                    let kind = match ft {
                        FileType::Fifo => tar::EntryType::Fifo,
                        FileType::BlockDevice => tar::EntryType::Block,
                        _ => tar::EntryType::Char,
                    };
                    let mut h = header_for(&st, kind, self.id_shift);
                    h.set_device_major(rustix::fs::major(st.st_rdev)).ctx(ctx)?;
                    h.set_device_minor(rustix::fs::minor(st.st_rdev)).ctx(ctx)?;
                    self.builder.append_data(&mut h, os, io::empty()).ctx(ctx)?;
                }
                _ => {} // sockets and the like cannot be archived
            }
        }
        Ok(())
    }
}

/// Reads exactly the size announced in the header; a file that shrank mid-read is an error
/// rather than a corrupt archive.
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while archiving",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshifts_ids_of_the_range_and_makes_others_nobody() {
        let shift = Some(IdShift {
            host_base: 1_000_000,
            size: 65_536,
        });
        assert_eq!(unshifted(1_000_000, shift), 0);
        assert_eq!(unshifted(1_001_000, shift), 1000);
        assert_eq!(unshifted(1_065_535, shift), 65_535);
        assert_eq!(unshifted(1_065_536, shift), NOBODY);
        assert_eq!(unshifted(0, shift), NOBODY);
        assert_eq!(unshifted(999_999, shift), NOBODY);
        assert_eq!(unshifted(1000, None), 1000);
    }
}
