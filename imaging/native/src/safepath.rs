//! Hostile-input-safe path handling: validating archive names and resolving them inside a layer
//! root without ever following a symlink (so no entry can reach outside the root).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{openat, openat2, statat, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::store::MAX_DEPTH;

/// Why a name was refused; becomes `UnsafeEntry(path, reason)` or `LimitExceeded`.
#[derive(Debug, PartialEq, Eq)]
pub enum NameError {
    /// The name is unsafe (absolute, `..`, NUL, ...).
    Unsafe(&'static str),
    /// The name is longer than allowed.
    TooLong,
}

/// Splits an archive name into its components, refusing anything that could name a path outside
/// the root: absolute names, `..` components, NUL bytes, over-long components. `.` and empty
/// components are dropped (`./usr//bin/` is `usr/bin`). An empty result means the root itself.
pub fn split_name(raw: &[u8], max_len: usize) -> Result<Vec<&[u8]>, NameError> {
    if raw.len() > max_len {
        return Err(NameError::TooLong);
    }
    if raw.contains(&0) {
        return Err(NameError::Unsafe("name contains a NUL byte"));
    }
    if raw.first() == Some(&b'/') {
        return Err(NameError::Unsafe("absolute path"));
    }
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(NameError::Unsafe("parent directory component")),
            c if c.len() > 255 => return Err(NameError::TooLong),
            c => out.push(c),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(NameError::TooLong);
    }
    Ok(out)
}

/// Why a directory inside the root could not be opened.
#[derive(Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// A component is a symlink: following it could leave the root.
    Symlink,
    /// A component exists but is not a directory.
    NotDir,
    /// A component does not exist (and creation was not asked for).
    Missing,
    /// The kernel reported an escape attempt.
    Escape,
    /// Any other failure.
    Os(Errno),
}

impl ResolveError {
    /// A reason string for `UnsafeEntry`.
    pub fn reason(&self) -> String {
        match self {
            ResolveError::Symlink => "path traverses a symlink".into(),
            ResolveError::NotDir => "path traverses a non-directory".into(),
            ResolveError::Missing => "parent directory does not exist".into(),
            ResolveError::Escape => "path escapes the layer root".into(),
            ResolveError::Os(e) => format!("cannot resolve path: {e}"),
        }
    }
}

/// A directory that names are resolved beneath. Keeps a one-entry cache of the last directory
/// opened, because tar entries arrive grouped by directory.
pub struct Root {
    fd: OwnedFd,
    openat2_ok: bool,
    cache: Option<(Vec<u8>, OwnedFd)>,
    /// Directories created because a deeper name needed them (`a/b` for an entry `a/b/c`),
    /// joined by `/`, in creation order.
    created: Vec<Vec<u8>>,
}

const DIR_FLAGS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Root {
    /// Wraps an open directory descriptor.
    pub fn new(fd: OwnedFd) -> Self {
        Root {
            fd,
            openat2_ok: true,
            cache: None,
            created: Vec::new(),
        }
    }

    /// The root directory itself.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Forgets the cached directory; called whenever something is removed or replaced, since
    /// a cached descriptor would then point at a detached directory.
    pub fn invalidate(&mut self) {
        self.cache = None;
    }

    /// Directories this root created on the way to other names (see `dir`), creation order.
    pub fn take_created(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.created)
    }

    /// Remembers `fd` as the directory named by `comps`.
    pub fn remember(&mut self, comps: &[&[u8]], fd: OwnedFd) {
        self.cache = Some((comps.join(&b'/'), fd));
    }

    /// Opens the directory named by `comps` (relative to the root), creating missing
    /// directories (mode 0755) if `create`. Never follows a symlink.
    pub fn dir(&mut self, comps: &[&[u8]], create: bool) -> Result<BorrowedFd<'_>, ResolveError> {
        if comps.is_empty() {
            return Ok(self.fd.as_fd());
        }
        let key = comps.join(&b'/');
        let hit = matches!(&self.cache, Some((k, _)) if *k == key);
        if !hit {
            let fd = self.open_dir_owned(comps, create)?;
            self.cache = Some((key, fd));
        }
        Ok(self.cache.as_ref().expect("just filled").1.as_fd())
    }

    /// Like `dir`, but returns a descriptor of its own and leaves the cache alone.
    pub fn open_dir_owned(
        &mut self,
        comps: &[&[u8]],
        create: bool,
    ) -> Result<OwnedFd, ResolveError> {
        if comps.is_empty() {
            return openat(&self.fd, ".", DIR_FLAGS, Mode::empty()).map_err(ResolveError::Os);
        }
        if self.openat2_ok {
            let joined = comps.join(&b'/');
            // RESOLVE_NO_SYMLINKS makes the kernel refuse any symlink on the way, and
            // RESOLVE_BENEATH refuses anything that would leave the root.
            let how =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match openat2(&self.fd, joined.as_slice(), DIR_FLAGS, Mode::empty(), how) {
                Ok(fd) => return Ok(fd),
                Err(Errno::NOSYS) => self.openat2_ok = false,
                Err(Errno::AGAIN) | Err(Errno::NOENT) => {}
                Err(Errno::LOOP) => return Err(ResolveError::Symlink),
                Err(Errno::XDEV) => return Err(ResolveError::Escape),
                Err(Errno::NOTDIR) => return Err(self.classify(comps)),
                Err(e) => return Err(ResolveError::Os(e)),
            }
        }
        self.walk(comps, create)
    }

    /// Component-by-component resolution with O_NOFOLLOW; also creates missing directories.
    fn walk(&mut self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, ResolveError> {
        let mut cur = openat(&self.fd, ".", DIR_FLAGS, Mode::empty()).map_err(ResolveError::Os)?;
        for (i, comp) in comps.iter().enumerate() {
            let (fd, made) = open_or_make_child_dir(&cur, comp, create)?;
            if made {
                self.created.push(comps[..=i].join(&b'/'));
            }
            cur = fd;
        }
        Ok(cur)
    }

    /// Finds out why a path could not be opened as a directory.
    fn classify(&mut self, comps: &[&[u8]]) -> ResolveError {
        match self.walk(comps, false) {
            Ok(_) => ResolveError::Os(Errno::NOTDIR),
            Err(e) => e,
        }
    }
}

/// Opens `name` in `dir` as a directory, refusing symlinks; creates it if missing and `create`.
pub fn open_child_dir(dir: &OwnedFd, name: &[u8], create: bool) -> Result<OwnedFd, ResolveError> {
    open_or_make_child_dir(dir, name, create).map(|(fd, _)| fd)
}

/// `open_child_dir`, also telling whether it created the directory.
fn open_or_make_child_dir(
    dir: &OwnedFd,
    name: &[u8],
    create: bool,
) -> Result<(OwnedFd, bool), ResolveError> {
    let mut made = false;
    for _ in 0..2 {
        match openat(dir, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => return Ok((fd, made)),
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(dir, name, Mode::from(0o755)) {
                    Ok(()) => {
                        made = true;
                        continue;
                    }
                    Err(Errno::EXIST) => continue,
                    Err(e) => return Err(ResolveError::Os(e)),
                }
            }
            Err(Errno::NOENT) => return Err(ResolveError::Missing),
            Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                return Err(match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                        ResolveError::Symlink
                    }
                    _ => ResolveError::NotDir,
                })
            }
            Err(e) => return Err(ResolveError::Os(e)),
        }
    }
    Err(ResolveError::Missing)
}

/// Opens a regular file for reading without ever opening anything else: an O_PATH descriptor is
/// checked with fstat, then reopened through /proc (a device or FIFO swapped in between the
/// directory listing and the open is never opened for real, so it cannot block or act). For every
/// tree a workload writes: its upper dir (commit), its volumes (backups).
pub fn open_regular(
    parent: &OwnedFd,
    name: &[u8],
) -> rustix::io::Result<Option<(std::fs::File, rustix::fs::Stat)>> {
    let p = openat(
        parent,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&p)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&p));
    let fd = openat(
        rustix::fs::CWD,
        proc.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    Ok(Some((std::fs::File::from(fd), st)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(crate::store::random_name("bulkhead-safepath-"));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn open_root(p: &PathBuf) -> Root {
        Root::new(openat(rustix::fs::CWD, p, DIR_FLAGS, Mode::empty()).unwrap())
    }

    #[test]
    fn split_accepts_ordinary_names() {
        assert_eq!(
            split_name(b"./usr//bin/", 4096).unwrap(),
            vec![&b"usr"[..], b"bin"]
        );
        assert!(split_name(b"./", 4096).unwrap().is_empty());
        assert_eq!(split_name(b"a/./b", 4096).unwrap(), vec![&b"a"[..], b"b"]);
    }

    #[test]
    fn split_refuses_escapes() {
        assert_eq!(
            split_name(b"/etc/passwd", 4096),
            Err(NameError::Unsafe("absolute path"))
        );
        for bad in [&b"../x"[..], b"a/../../x", b"a/..", b".."] {
            assert_eq!(
                split_name(bad, 4096),
                Err(NameError::Unsafe("parent directory component")),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            split_name(b"a\0b", 4096),
            Err(NameError::Unsafe(_))
        ));
        assert_eq!(split_name(&[b'a'; 300], 4096), Err(NameError::TooLong));
        assert_eq!(split_name(b"abcdef", 3), Err(NameError::TooLong));
        let deep = "a/".repeat(MAX_DEPTH + 1);
        assert_eq!(split_name(deep.as_bytes(), 4096), Err(NameError::TooLong));
    }

    #[test]
    fn resolution_refuses_symlinks_and_creates_dirs() {
        let d = tmp();
        let outside = tmp();
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();
        std::fs::write(d.join("file"), b"x").unwrap();
        let mut root = open_root(&d);
        assert_eq!(
            root.dir(&[b"link"], true).unwrap_err(),
            ResolveError::Symlink
        );
        assert_eq!(
            root.dir(&[b"link", b"sub"], true).unwrap_err(),
            ResolveError::Symlink
        );
        assert_eq!(
            root.dir(&[b"file", b"sub"], true).unwrap_err(),
            ResolveError::NotDir
        );
        assert_eq!(
            root.dir(&[b"new", b"deeper"], false).unwrap_err(),
            ResolveError::Missing
        );
        root.dir(&[b"new", b"deeper"], true).unwrap();
        assert!(d.join("new/deeper").is_dir());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

        // The fallback walk gives the same answers as openat2.
        let mut root = open_root(&d);
        root.openat2_ok = false;
        assert_eq!(
            root.dir(&[b"link", b"sub"], true).unwrap_err(),
            ResolveError::Symlink
        );
        assert_eq!(
            root.dir(&[b"file", b"x"], true).unwrap_err(),
            ResolveError::NotDir
        );
        root.dir(&[b"other", b"x"], true).unwrap();
        assert!(d.join("other/x").is_dir());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        std::fs::remove_dir_all(d).unwrap();
        std::fs::remove_dir_all(outside).unwrap();
    }
}
