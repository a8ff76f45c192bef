//! Flattening a layer chain into one tree (applying whiteouts and opaque dirs for real) and
//! building a read-only erofs or ext4 disk from it for micro-VMs.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use rustix::fs::{
    fchmod, fchown, fgetxattr, flistxattr, fsetxattr, futimens, linkat, mkdirat, openat, statat,
    unlinkat, AtFlags, Dir, FileType, Gid, Mode, OFlags, Stat, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use crate::digest::{chain_id, Digest};
use crate::error::{IoContext, Result, StoreError};
use crate::safepath::Root;
use crate::store::{random_name, rename_noreplace, Stats, Store, TempGuard, MAX_DEPTH};
use crate::unpack::open_path_dir;

/// Disk image formats `build_disk` can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Erofs,
    Ext4,
}

impl DiskFormat {
    /// Parses "erofs" or "ext4".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "erofs" => Ok(DiskFormat::Erofs),
            "ext4" => Ok(DiskFormat::Ext4),
            other => Err(StoreError::Invalid(format!(
                "unknown disk format {other:?}"
            ))),
        }
    }

    /// The file extension used in `disks/`.
    pub fn ext(self) -> &'static str {
        match self {
            DiskFormat::Erofs => "erofs",
            DiskFormat::Ext4 => "ext4",
        }
    }
}

const RD_DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Totals gathered while flattening, used to size an ext4 image.
#[derive(Default, Debug, Clone, Copy)]
pub struct TreeSize {
    /// Sum of regular file sizes rounded up to 4 KiB blocks.
    pub data_bytes: u64,
    /// Number of inodes (entries) in the tree.
    pub inodes: u64,
}

impl Store {
    /// Builds (or finds) the disk of a layer chain, bottom layer first. Returns its path.
    pub fn build_disk(
        &self,
        diff_ids: &[Digest],
        format: DiskFormat,
    ) -> Result<std::path::PathBuf> {
        let chain = chain_id(diff_ids)?;
        let out = self.disk_path(&chain, format.ext());
        if out.is_file() {
            return Ok(out);
        }
        // Each layer as stacked on the ones below (a variant where it writes through their
        // symlinked directories), exactly what containers get as lower dirs.
        let layers = self.chain_dirs(diff_ids)?;
        let tmp = self.sub("disks").join(random_name(".tmp-"));
        std::fs::create_dir(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        let _guard = TempGuard::new(tmp.clone());
        let tree = tmp.join("root");
        std::fs::create_dir(&tree).ctx(|| "creating flatten root".into())?;
        // mkfs.ext4 -d looks up every multiply-linked inode in a list (quadratic), so for ext4
        // the tree gets copies; erofs-utils hashes inodes, so hard links (no data copied) are fine.
        let mode = match format {
            DiskFormat::Erofs => Materialise::HardLink,
            DiskFormat::Ext4 => Materialise::Copy,
        };
        let size = flatten(&layers, &tree, mode)?;
        let image = tmp.join(format!("image.{}", format.ext()));
        match format {
            DiskFormat::Erofs => run_tool(
                Command::new("mkfs.erofs")
                    .arg("--quiet")
                    // Hard links from the layer store carry foreign link counts; erofs
                    // recomputes them from the tree.
                    .arg(&image)
                    .arg(&tree),
                "mkfs.erofs",
            )?,
            DiskFormat::Ext4 => {
                let bytes = ext4_size(size);
                let inodes = size.inodes + 4096;
                run_tool(
                    Command::new("mkfs.ext4")
                        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
                        // A read-only root disk needs no journal.
                        .args(["-O", "^has_journal", "-N"])
                        .arg(inodes.to_string())
                        .arg("-d")
                        .arg(&tree)
                        .arg(&image)
                        .arg(format!("{}k", bytes / 1024)),
                    "mkfs.ext4",
                )?
            }
        }
        let f = std::fs::File::open(&image).ctx(|| "opening disk image".into())?;
        f.sync_all().ctx(|| "syncing disk image".into())?;
        if rename_noreplace(&image, &out)? {
            crate::store::sync_dir(out.parent().expect("disk has a parent"))?;
            Stats::add(&self.stats.disks_built, 1);
        }
        Ok(out)
    }
}

fn ext4_size(size: TreeSize) -> u64 {
    // Data, inode tables (256 B each) and per-entry directory blocks, plus slack for metadata.
    let raw = size.data_bytes + size.inodes * (256 + 4096 / 8) + (32 << 20);
    let with_slack = raw + raw / 8;
    with_slack.div_ceil(4096) * 4096
}

fn run_tool(cmd: &mut Command, tool: &str) -> Result<()> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| StoreError::Tool {
            tool: tool.into(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        let mut message = String::from_utf8_lossy(&out.stderr).into_owned();
        message.truncate(2000);
        return Err(StoreError::Tool {
            tool: tool.into(),
            message: format!("{}: {message}", out.status),
        });
    }
    Ok(())
}

/// How non-directories get from a layer into the flattened tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Materialise {
    /// Hard link to the layer's inode: no data copied.
    HardLink,
    /// Copy regular files (hard links inside a layer are kept as hard links in the tree).
    Copy,
}

/// Merges `layers` (bottom first) into the empty directory `dest` the way overlayfs would show
/// them: whiteouts delete, opaque dirs hide what is below, upper entries replace lower ones.
/// Directories are created fresh with the topmost layer's metadata.
pub fn flatten(layers: &[impl AsRef<Path>], dest: &Path, mode: Materialise) -> Result<TreeSize> {
    let dst = open_rd(&open_path_dir(dest)?, ".")?;
    for layer in layers {
        let src = open_rd(&open_path_dir(layer.as_ref())?, ".")?;
        if is_opaque(&src) {
            clear_dir(&dst, 0)?;
        }
        let mut m = Merge {
            mode,
            links: HashMap::new(),
            tree: Root::new(open_path_dir(dest)?),
        };
        m.dir(&src, &dst, &[], 0)?;
        let st = rustix::fs::fstat(&src).ctx(|| "stat layer root".into())?;
        copy_dir_meta(&st, &src, &dst)?;
    }
    let mut size = TreeSize::default();
    if mode == Materialise::Copy {
        // Only ext4 (the copy mode) needs the tree's size, to size the image.
        measure(&dst, &mut size, 0)?;
    }
    Ok(size)
}

fn open_rd(dir: &OwnedFd, name: impl rustix::path::Arg) -> Result<OwnedFd> {
    openat(dir, name, RD_DIR, Mode::empty()).ctx(|| "opening directory".into())
}

fn list(dir: &OwnedFd) -> Result<Vec<(Vec<u8>, FileType)>> {
    let mut out = Vec::new();
    let d = Dir::read_from(dir).ctx(|| "reading directory".into())?;
    for ent in d {
        let ent = ent.ctx(|| "reading directory".into())?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((name.to_vec(), ent.file_type()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn is_opaque(dir: &OwnedFd) -> bool {
    let mut buf = [0u8; 4];
    matches!(fgetxattr(dir, "trusted.overlay.opaque", &mut buf[..]), Ok(1) if buf[0] == b'y')
}

fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn depth_check(depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(StoreError::LimitExceeded(format!(
            "tree deeper than {MAX_DEPTH}"
        )));
    }
    Ok(())
}

/// State of merging one layer.
struct Merge {
    mode: Materialise,
    /// In copy mode: layer inode -> where its first name landed in the tree.
    links: HashMap<(u64, u64), Vec<u8>>,
    tree: Root,
}

impl Merge {
    fn dir(&mut self, src: &OwnedFd, dst: &OwnedFd, rel: &[u8], depth: usize) -> Result<()> {
        depth_check(depth)?;
        for (name, _) in list(src)? {
            let st =
                statat(src, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).ctx(|| "stat".into())?;
            let existing = statat(dst, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).ok();
            if is_whiteout(&st) {
                if existing.is_some() {
                    remove_tree_at(dst, &name, depth)?;
                }
                continue;
            }
            let path = join(rel, &name);
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                let sfd = open_rd(src, name.as_slice())?;
                let dst_is_dir = existing
                    .as_ref()
                    .is_some_and(|e| FileType::from_raw_mode(e.st_mode) == FileType::Directory);
                if !dst_is_dir {
                    if existing.is_some() {
                        remove_tree_at(dst, &name, depth)?;
                    }
                    mkdirat(dst, name.as_slice(), Mode::from(0o700)).ctx(|| "mkdir".into())?;
                }
                let dfd = open_rd(dst, name.as_slice())?;
                if dst_is_dir && is_opaque(&sfd) {
                    clear_dir(&dfd, depth + 1)?;
                }
                self.dir(&sfd, &dfd, &path, depth + 1)?;
                copy_dir_meta(&st, &sfd, &dfd)?;
                continue;
            }
            if existing.is_some() {
                remove_tree_at(dst, &name, depth)?;
                // A cached directory in the tree may be gone now.
                self.tree.invalidate();
            }
            let is_file = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile;
            if self.mode == Materialise::HardLink || !is_file {
                linkat(src, name.as_slice(), dst, name.as_slice(), AtFlags::empty())
                    .ctx(|| format!("linking {}", String::from_utf8_lossy(&path)))?;
                continue;
            }
            let key = (st.st_dev, st.st_ino);
            if st.st_nlink > 1 {
                if let Some(first) = self.links.get(&key).cloned() {
                    if self.link_within_tree(&first, dst, &name)? {
                        continue;
                    }
                }
                self.links.insert(key, path.clone());
            }
            copy_file(src, dst, &name, &st)?;
        }
        Ok(())
    }

    /// Hard-links `first` (a path in the tree) as `name` in `dst`; false if `first` is gone.
    fn link_within_tree(&mut self, first: &[u8], dst: &OwnedFd, name: &[u8]) -> Result<bool> {
        let comps: Vec<&[u8]> = first.split(|&b| b == b'/').collect();
        let (fname, parent) = comps.split_last().expect("non-empty path");
        let Ok(pfd) = self.tree.open_dir_owned(parent, false) else {
            return Ok(false);
        };
        match linkat(&pfd, *fname, dst, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(e).ctx(|| "linking within tree".into()),
        }
    }
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = rel.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Copies a regular file with its owner, xattrs, mode and mtime.
fn copy_file(src: &OwnedFd, dst: &OwnedFd, name: &[u8], st: &Stat) -> Result<()> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    let from = openat(
        src,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| format!("opening {}", shown()))?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let to = openat(dst, name, flags, Mode::from(0o600)).ctx(|| format!("creating {}", shown()))?;
    let mut left = st.st_size as u64;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        let n = rustix::fs::copy_file_range(&from, None, &to, None, chunk)
            .ctx(|| format!("copying {}", shown()))?;
        if n == 0 {
            break; // the file shrank; the layer store is ours, so this is not expected
        }
        left -= n as u64;
    }
    if rustix::process::geteuid().is_root() {
        fchown(
            &to,
            Some(Uid::from_raw(st.st_uid)),
            Some(Gid::from_raw(st.st_gid)),
        )
        .ctx(|| "chown".into())?;
    }
    copy_xattrs(from.as_fd(), to.as_fd())?;
    fchmod(&to, Mode::from_raw_mode(st.st_mode & 0o7777)).ctx(|| "chmod".into())?;
    futimens(&to, &times_of(st)).ctx(|| "utimes".into())
}

fn times_of(st: &Stat) -> Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: st.st_mtime as _,
        tv_nsec: st.st_mtime_nsec as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn copy_dir_meta(st: &Stat, src: &OwnedFd, dst: &OwnedFd) -> Result<()> {
    if rustix::process::geteuid().is_root() {
        fchown(
            dst,
            Some(Uid::from_raw(st.st_uid)),
            Some(Gid::from_raw(st.st_gid)),
        )
        .ctx(|| "chown".into())?;
    }
    copy_xattrs(src.as_fd(), dst.as_fd())?;
    fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o7777)).ctx(|| "chmod".into())?;
    futimens(dst, &times_of(st)).ctx(|| "utimes".into())
}

/// Copies xattrs except overlayfs' own markers (they must not reach a flattened disk).
pub fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> Result<()> {
    for name in xattr_names(src)? {
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            continue;
        }
        let value = xattr_value(src, &name)?;
        match fsetxattr(dst, name.as_slice(), &value, XattrFlags::empty()) {
            Ok(()) | Err(Errno::NOTSUP) => {}
            Err(e) => return Err(e).ctx(|| "setxattr".into()),
        }
    }
    Ok(())
}

/// Lists xattr names of an open file.
pub fn xattr_names(fd: BorrowedFd<'_>) -> Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    let n = loop {
        match flistxattr(fd, &mut buf[..]) {
            Ok(n) => break n,
            Err(Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx(|| "listxattr".into()),
        }
    };
    Ok(buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect())
}

/// Reads one xattr of an open file.
pub fn xattr_value(fd: BorrowedFd<'_>, name: &[u8]) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match fgetxattr(fd, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e).ctx(|| "getxattr".into()),
        }
    }
}

fn clear_dir(dir: &OwnedFd, depth: usize) -> Result<()> {
    for (name, _) in list(dir)? {
        remove_tree_at(dir, &name, depth)?;
    }
    Ok(())
}

/// Removes `name` in `dir`, recursively if it is a directory, never following symlinks.
pub fn remove_tree_at(dir: &OwnedFd, name: &[u8], depth: usize) -> Result<()> {
    depth_check(depth)?;
    match unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e).ctx(|| "unlink".into()),
    }
    let sub = open_rd(dir, name)?;
    clear_dir(&sub, depth + 1)?;
    drop(sub);
    unlinkat(dir, name, AtFlags::REMOVEDIR).ctx(|| "rmdir".into())
}

fn measure(dir: &OwnedFd, size: &mut TreeSize, depth: usize) -> Result<()> {
    depth_check(depth)?;
    for (name, ft) in list(dir)? {
        size.inodes += 1;
        match ft {
            FileType::Directory => {
                let sub = open_rd(dir, name.as_slice())?;
                measure(&sub, size, depth + 1)?;
                size.data_bytes += 4096;
            }
            FileType::RegularFile => {
                let st = statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                    .ctx(|| "stat".into())?;
                size.data_bytes += (st.st_size as u64).div_ceil(4096) * 4096;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mknod_whiteout(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            FileType::CharacterDevice,
            Mode::empty(),
            0,
        )
        .unwrap();
    }

    #[test]
    fn flatten_applies_whiteouts_and_opaque_dirs() {
        let base = std::env::temp_dir().join(random_name("bulkhead-flatten-"));
        let (l0, l1, out) = (base.join("l0"), base.join("l1"), base.join("out"));
        for d in [&l0, &l1, &out] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(l0.join("etc")).unwrap();
        std::fs::write(l0.join("etc/keep"), b"k").unwrap();
        std::fs::write(l0.join("etc/gone"), b"g").unwrap();
        std::fs::create_dir_all(l0.join("opq/sub")).unwrap();
        std::fs::write(l0.join("opq/old"), b"o").unwrap();
        symlink("/etc", l0.join("link")).unwrap();

        std::fs::create_dir_all(l1.join("etc")).unwrap();
        mknod_whiteout(&l1.join("etc/gone"));
        std::fs::create_dir_all(l1.join("opq")).unwrap();
        rustix::fs::setxattr(
            l1.join("opq"),
            "trusted.overlay.opaque",
            b"y",
            XattrFlags::empty(),
        )
        .unwrap();
        std::fs::write(l1.join("opq/new"), b"n").unwrap();
        mknod_whiteout(&l1.join("never-existed"));

        let size = flatten(&[&l0, &l1], &out, Materialise::Copy).unwrap();
        assert!(out.join("etc/keep").is_file());
        assert!(!out.join("etc/gone").exists());
        assert!(out.join("opq/new").is_file());
        assert!(!out.join("opq/old").exists());
        assert!(!out.join("opq/sub").exists());
        assert!(std::fs::symlink_metadata(out.join("never-existed")).is_err());
        assert_eq!(
            std::fs::read_link(out.join("link")).unwrap(),
            Path::new("/etc")
        );
        let mut buf = [0u8; 4];
        assert!(
            rustix::fs::getxattr(out.join("opq"), "trusted.overlay.opaque", &mut buf[..]).is_err()
        );
        assert_eq!(size.inodes, 5); // etc, etc/keep, opq, opq/new, link
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn copy_mode_copies_files_but_keeps_hard_links() {
        use std::os::unix::fs::MetadataExt;
        let base = std::env::temp_dir().join(random_name("bulkhead-flatten-copy-"));
        let (l0, out) = (base.join("l0"), base.join("out"));
        std::fs::create_dir_all(l0.join("bin")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(l0.join("bin/a"), b"tool").unwrap();
        std::fs::hard_link(l0.join("bin/a"), l0.join("bin/b")).unwrap();
        std::fs::write(l0.join("single"), b"s").unwrap();
        flatten(&[&l0], &out, Materialise::Copy).unwrap();
        let (a, b) = (
            out.join("bin/a").metadata().unwrap(),
            out.join("bin/b").metadata().unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.nlink(), 2);
        assert_ne!(a.ino(), l0.join("bin/a").metadata().unwrap().ino());
        assert_eq!(out.join("single").metadata().unwrap().nlink(), 1);
        assert_eq!(std::fs::read(out.join("bin/b")).unwrap(), b"tool");
        std::fs::remove_dir_all(base).unwrap();
    }
}
