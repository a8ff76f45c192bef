//! Restoring a manifest into an empty directory, treating the manifest as hostile: it was
//! validated (`Manifest::validate`) before anything is written, every parent is resolved inside
//! the target without following a symlink (the layer store's `safepath::Root`), files are created
//! with O_EXCL|O_NOFOLLOW, every chunk is checked against its digest, and on any failure the
//! target is emptied again (nothing partial is left).

use std::fs::{self, File};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use rustix::fs::{
    chmodat, chownat, fchmod, fchown, futimens, linkat, mkdirat, mknodat, openat, statat,
    symlinkat, utimensat, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid,
};
use rustix::io::Errno;

use super::chunks::ChunkStore;
use super::manifest::{components, Entry, Kind, Manifest};
use crate::error::{IoContext, Result, StoreError};
use crate::safepath::Root;

/// What a restore may keep.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestorePolicy {
    /// Keep setuid/setgid bits on files (off: a backup must not plant a setuid binary on a host).
    pub allow_setid: bool,
}

/// What a restore did.
#[derive(Clone, Debug, Default)]
pub struct RestoreStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
}

fn unsafe_at(e: &Entry, reason: impl Into<String>) -> StoreError {
    StoreError::unsafe_entry(e.path.shown(), reason)
}

fn open_rd(dir: &Path) -> Result<OwnedFd> {
    openat(
        rustix::fs::CWD,
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| format!("opening {}", dir.display()))
}

fn times(e: &Entry) -> Timestamps {
    let t = Timespec {
        tv_sec: e.mtime.0,
        tv_nsec: e.mtime.1.min(999_999_999) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

struct Restorer<'a> {
    store: &'a ChunkStore,
    target: OwnedFd,
    is_root: bool,
    policy: RestorePolicy,
    bytes: AtomicU64,
    progress: Option<&'a (dyn Fn(u64) + Sync)>,
}

impl Restorer<'_> {
    fn root(&self) -> Result<Root> {
        let fd = self
            .target
            .try_clone()
            .ctx(|| "duplicating a descriptor".into())?;
        Ok(Root::new(fd))
    }

    fn parent(&self, root: &mut Root, e: &Entry, parent: &[&[u8]]) -> Result<OwnedFd> {
        root.open_dir_owned(parent, true)
            .map_err(|r| unsafe_at(e, r.reason()))
    }

    fn mode(&self, e: &Entry) -> u32 {
        if self.policy.allow_setid || e.kind == Kind::Dir {
            e.mode
        } else {
            e.mode & !0o6000
        }
    }

    fn own(&self, fd: impl AsFd, e: &Entry) -> Result<()> {
        if self.is_root {
            fchown(&fd, Some(Uid::from_raw(e.uid)), Some(Gid::from_raw(e.gid)))
                .ctx(|| format!("chown {}", e.path.shown()))?;
        }
        // chown clears setid bits, so the mode goes after it.
        fchmod(&fd, Mode::from_raw_mode(self.mode(e))).ctx(|| format!("chmod {}", e.path.shown()))
    }

    fn dir(&self, root: &mut Root, e: &Entry) -> Result<()> {
        let comps = components(&e.path)?;
        let Some((name, parent)) = comps.split_last() else {
            return Ok(()); // the target itself: its metadata is set at the end
        };
        let pfd = self.parent(root, e, parent)?;
        match mkdirat(&pfd, *name, Mode::from_raw_mode(0o700)) {
            Ok(()) => Ok(()),
            // Made earlier as the parent of an entry listed before it.
            Err(Errno::EXIST) => match statat(&pfd, *name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(()),
                _ => Err(unsafe_at(e, "directory replaces another entry")),
            },
            Err(err) => Err(err).ctx(|| format!("mkdir {}", e.path.shown())),
        }
    }

    fn file(&self, root: &mut Root, e: &Entry) -> Result<()> {
        let comps = components(&e.path)?;
        let (name, parent) = comps.split_last().expect("validated: not the root");
        let pfd = self.parent(root, e, parent)?;
        let fd = openat(
            &pfd,
            *name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|err| match err {
            Errno::EXIST => unsafe_at(e, "file replaces another entry"),
            err => StoreError::Io {
                context: format!("creating {}", e.path.shown()),
                source: err.into(),
            },
        })?;
        let f = File::from(fd);
        let mut offset = 0u64;
        for c in &e.chunks {
            let d = crate::digest::Digest::parse(&c.0)?;
            let data = self.store.read_chunk(&d, c.1)?;
            // All-zero chunks become holes: database and disk-image files stay sparse.
            if data.iter().any(|&b| b != 0) {
                f.write_all_at(&data, offset)
                    .ctx(|| format!("writing {}", e.path.shown()))?;
            }
            offset += c.1;
            let done = self.bytes.fetch_add(c.1, Ordering::Relaxed) + c.1;
            if let Some(p) = self.progress {
                p(done);
            }
        }
        f.set_len(e.size)
            .ctx(|| format!("sizing {}", e.path.shown()))?;
        self.own(&f, e)?;
        futimens(&f, &times(e)).ctx(|| format!("utimes {}", e.path.shown()))
    }

    fn other(&self, root: &mut Root, e: &Entry) -> Result<()> {
        let comps = components(&e.path)?;
        let (name, parent) = comps.split_last().expect("validated: not the root");
        let pfd = self.parent(root, e, parent)?;
        let exists = |err: Errno| match err {
            Errno::EXIST => unsafe_at(e, "entry replaces another entry"),
            err => StoreError::Io {
                context: format!("creating {}", e.path.shown()),
                source: err.into(),
            },
        };
        match e.kind {
            Kind::Symlink => {
                let t = e.target.as_ref().expect("validated");
                symlinkat(t.0.as_slice(), &pfd, *name).map_err(exists)?;
            }
            Kind::Fifo => {
                mknodat(&pfd, *name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(exists)?;
            }
            Kind::Hardlink => {
                let t = e.target.as_ref().expect("validated");
                let tcomps = components(t)?;
                let (tname, tparent) = tcomps.split_last().expect("validated: a file");
                let tfd = root
                    .open_dir_owned(tparent, false)
                    .map_err(|r| unsafe_at(e, format!("hard link target: {}", r.reason())))?;
                match statat(&tfd, *tname, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {}
                    _ => return Err(unsafe_at(e, "hard link target is not a restored file")),
                }
                linkat(&tfd, *tname, &pfd, *name, AtFlags::empty()).map_err(exists)?;
                return Ok(()); // a link shares its target's metadata
            }
            Kind::Dir | Kind::File => unreachable!("handled elsewhere"),
        }
        if self.is_root {
            chownat(
                &pfd,
                *name,
                Some(Uid::from_raw(e.uid)),
                Some(Gid::from_raw(e.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .ctx(|| format!("chown {}", e.path.shown()))?;
        }
        if e.kind == Kind::Fifo {
            chmodat(
                &pfd,
                *name,
                Mode::from_raw_mode(self.mode(e)),
                AtFlags::empty(),
            )
            .ctx(|| format!("chmod {}", e.path.shown()))?;
        }
        utimensat(&pfd, *name, &times(e), AtFlags::SYMLINK_NOFOLLOW)
            .ctx(|| format!("utimes {}", e.path.shown()))
    }

    fn dir_meta(&self, root: &mut Root, e: &Entry) -> Result<()> {
        let comps = components(&e.path)?;
        let fd = match comps.split_last() {
            None => self
                .target
                .try_clone()
                .ctx(|| "duplicating a descriptor".into())?,
            Some((name, parent)) => {
                let pfd = self.parent(root, e, parent)?;
                openat(
                    &pfd,
                    *name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ctx(|| format!("opening {}", e.path.shown()))?
            }
        };
        self.own(&fd, e)?;
        futimens(&fd, &times(e)).ctx(|| format!("utimes {}", e.path.shown()))
    }

    fn run(&self, m: &Manifest) -> Result<RestoreStats> {
        let mut root = self.root()?;
        for e in m.entries.iter().filter(|e| e.kind == Kind::Dir) {
            self.dir(&mut root, e)?;
        }
        let files: Vec<&Entry> = m.entries.iter().filter(|e| e.kind == Kind::File).collect();
        files
            .par_iter()
            .map_init(
                || self.root(),
                |r, e| {
                    let r = r.as_mut().map_err(|e| StoreError::Invalid(e.to_string()))?;
                    self.file(r, e)
                },
            )
            .collect::<Result<()>>()?;
        for e in m
            .entries
            .iter()
            .filter(|e| !matches!(e.kind, Kind::Dir | Kind::File))
        {
            self.other(&mut root, e)?;
        }
        // Deepest first: setting a directory's mtime before its children are made is undone.
        for e in m.entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
            self.dir_meta(&mut root, e)?;
        }
        Ok(RestoreStats {
            entries: m.entries.len() as u64,
            files: files.len() as u64,
            bytes: self.bytes.load(Ordering::Relaxed),
        })
    }
}

/// Removes everything inside `dir` (not `dir` itself); symlinks inside are removed, not followed.
fn empty_dir(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for ent in rd.flatten() {
            let _ = crate::store::remove_any(&ent.path());
        }
    }
}

impl ChunkStore {
    /// Restores manifest `m` into `target`, an empty directory (created if missing). On failure
    /// the target is left empty.
    pub fn restore(
        &self,
        m: &Manifest,
        target: &Path,
        policy: RestorePolicy,
        progress: Option<&(dyn Fn(u64) + Sync)>,
    ) -> Result<RestoreStats> {
        m.validate(super::manifest::RestoreLimits::default())?;
        fs::create_dir_all(target).ctx(|| format!("creating {}", target.display()))?;
        let fd = open_rd(target)?;
        if fs::read_dir(target)
            .ctx(|| format!("listing {}", target.display()))?
            .next()
            .is_some()
        {
            return Err(StoreError::Invalid(format!(
                "restore target {} is not empty",
                target.display()
            )));
        }
        let r = Restorer {
            store: self,
            target: fd,
            is_root: rustix::process::geteuid().is_root(),
            policy,
            bytes: AtomicU64::new(0),
            progress,
        };
        let out = r.run(m).and_then(|stats| {
            // A restored volume is handed to a workload next: make it durable first.
            if self.durable {
                rustix::fs::syncfs(&r.target).ctx(|| "syncing the restore".into())?;
            }
            Ok(stats)
        });
        if out.is_err() {
            empty_dir(target);
        }
        out
    }
}
