//! Layers stacked on symlinked directories of the layers below them.
//!
//! containerd's and Docker's appliers write a layer into the tree of the layers below it and
//! resolve each entry's *parent* path through that tree's symlinks, chroot-style (an absolute
//! link starts at the image root, `..` stops there); the entry's own name is never followed, and
//! a directory entry replaces a symlink. Here a layer is unpacked on its own, because its tree is
//! shared per DiffID by every image and tenant, so stacking it as an overlay lower dir differs
//! from those appliers in one way only: a directory the layer created *implicitly* (the parent of
//! entries that had no directory entry of their own, recorded at unpack in `implicit`) shadows a
//! symlink of the layers below, where the appliers would have written through it.
//!
//! `chain_dirs` finds those cases. When a layer has one, the store builds a variant of it for
//! this chain, `layers/chains/<chainid>/fs`: the layer's own inodes, hard-linked (no data copied)
//! at the places the appliers would have written them, and hands it out instead of the layer.
//! Every other layer is used as it is, so an ordinary image costs one failed `open` per layer.
//!
//! Resolution is logical: link targets are read, never followed, and joined component by
//! component inside the image root; the variant is written through descriptors opened with
//! `O_NOFOLLOW` below its own directory, so no link (absolute, `../../..`, loops, chains of
//! links) can make it write anywhere else.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    fchmod, fchown, fgetxattr, fsetxattr, fstat, futimens, linkat, mkdirat, openat, readlinkat,
    statat, unlinkat, AtFlags, Dir, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid,
    XattrFlags,
};
use rustix::io::Errno;

use crate::digest::{chain_id, Digest};
use crate::error::{IoContext, Result, StoreError};
use crate::flatten::copy_xattrs;
use crate::safepath::Root;
use crate::store::{random_name, rename_noreplace, Store, TempGuard, MAX_DEPTH};
use crate::unpack::{open_path_dir, IMPLICIT_DIRS_FILE};

/// Symlinks followed while resolving one path, as the kernel's `MAXSYMLINKS`; more is a loop.
pub const MAX_LINKS: usize = 40;

const RD_DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

const OPAQUE: &str = "trusted.overlay.opaque";

/// A path inside the image, as components (never `.`, `..` or empty).
type Comps = Vec<Vec<u8>>;

impl Store {
    /// The directories to stack for a chain of layers (bottom first): each layer's own tree, or
    /// where it has implicit directories that resolve through a symlink of the layers below,
    /// this chain's variant of it (built once, then found).
    pub fn chain_dirs(&self, diff_ids: &[Digest]) -> Result<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = Vec::with_capacity(diff_ids.len());
        for (i, d) in diff_ids.iter().enumerate() {
            if !self.has_layer(d) {
                return Err(StoreError::NotFound(format!("layer {d} is not unpacked")));
            }
            let own = self.layer_dir(d).join("fs");
            let implicit = if i == 0 {
                Vec::new() // nothing below the bottom layer to write through
            } else {
                self.implicit_dirs(d)?
            };
            if implicit.is_empty() {
                out.push(own);
                continue;
            }
            let chain = chain_id(&diff_ids[..=i])?;
            let variant = self.sub("layers/chains").join(chain.hex());
            if variant.join("meta").is_file() {
                out.push(variant.join("fs"));
                continue;
            }
            let mut view = LowerView::open(&out)?;
            let set: HashSet<&[u8]> = implicit.iter().map(Vec::as_slice).collect();
            if !meets_a_symlink(&mut view, &own, &implicit, &set)? {
                out.push(own);
                continue;
            }
            self.build_variant(&own, &set, &mut view, &diff_ids[..=i], &variant)?;
            out.push(variant.join("fs"));
        }
        Ok(out)
    }

    /// The layer's implicit directories (none for layers unpacked before they were recorded).
    fn implicit_dirs(&self, diff_id: &Digest) -> Result<Vec<Vec<u8>>> {
        let p = self.layer_dir(diff_id).join(IMPLICIT_DIRS_FILE);
        match std::fs::read(&p) {
            Ok(data) => Ok(data
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(<[u8]>::to_vec)
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).ctx(|| format!("reading {}", p.display())),
        }
    }

    fn build_variant(
        &self,
        own: &Path,
        implicit: &HashSet<&[u8]>,
        view: &mut LowerView,
        chain: &[Digest],
        dest: &Path,
    ) -> Result<()> {
        let tmp = self.sub("layers/chains").join(random_name(".tmp-"));
        std::fs::create_dir(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        let mut guard = TempGuard::new(tmp.clone());
        let fs_dir = tmp.join("fs");
        std::fs::create_dir(&fs_dir).ctx(|| format!("creating {}", fs_dir.display()))?;
        for d in [&tmp, &fs_dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .ctx(|| format!("chmod {}", d.display()))?;
        }
        let mut b = Builder {
            view,
            implicit,
            layer: Root::new(open_path_dir(own)?),
            variant: Root::new(open_path_dir(&fs_dir)?),
            metas: HashMap::new(),
        };
        b.run()?;
        let mut meta = format!("chain={}\n", chain_id(chain)?);
        for d in chain {
            meta.push_str(&format!("diff_id={d}\n"));
        }
        std::fs::write(tmp.join("meta"), meta).ctx(|| "writing chain meta".into())?;
        if self.durable {
            let dir = std::fs::File::open(&tmp).ctx(|| "opening chain dir".into())?;
            rustix::fs::syncfs(&dir).ctx(|| "syncing chain dir".into())?;
        }
        if rename_noreplace(&tmp, dest)? {
            guard.disarm();
            crate::store::sync_dir(dest.parent().expect("variant has a parent"))?;
        }
        Ok(())
    }
}

/// Whether some implicit directory of the layer at `own`, reached through directories that stay
/// where they are, is a symlink in the layers below (so the layer needs a variant).
fn meets_a_symlink(
    view: &mut LowerView,
    own: &Path,
    implicit: &[Vec<u8>],
    set: &HashSet<&[u8]>,
) -> Result<bool> {
    let mut layer = Root::new(open_path_dir(own)?);
    let root = view.root_state()?;
    // The previous path's components and the state below each of its prefixes: the sorted
    // list shares long prefixes, so each directory is looked up once.
    let mut prev: Vec<&[u8]> = Vec::new();
    let mut states: Vec<Option<DirState>> = Vec::new();
    for p in implicit {
        let comps: Vec<&[u8]> = p.split(|&b| b == b'/').collect();
        if layer.open_dir_owned(&comps, false).is_err() {
            continue; // replaced later in the layer by something else
        }
        let common = prev.iter().zip(&comps).take_while(|(a, b)| a == b).count();
        prev.truncate(common);
        states.truncate(common);
        for k in common..comps.len() {
            let parent = if k == 0 {
                Some(&root)
            } else {
                states[k - 1].as_ref()
            };
            let next = match parent {
                None => None,
                Some(ps) => match view.step(ps, comps[k])? {
                    Step::Dir(s) => Some(s),
                    Step::Symlink(_) if set.contains(comps[..=k].join(&b'/').as_slice()) => {
                        return Ok(true)
                    }
                    // An explicit directory replaces a symlink; a file below is shadowed.
                    Step::Symlink(_) | Step::Missing | Step::Other => None,
                },
            };
            prev.push(comps[k]);
            states.push(next);
        }
    }
    Ok(false)
}

/// A directory of the merged view of the layers below: its path and the layers (top-most
/// first) that contribute a directory there, whiteouts and opaque directories applied.
#[derive(Clone, Debug)]
struct DirState {
    path: Comps,
    active: Vec<usize>,
}

/// What one name in a directory of the merged view is.
enum Step {
    Dir(DirState),
    Symlink(Vec<u8>),
    Missing,
    /// A file, device or anything else that is not a directory.
    Other,
}

/// The layers below, read as overlayfs would merge them, never following a symlink.
struct LowerView {
    layers: Vec<Root>,
}

impl LowerView {
    fn open(dirs: &[PathBuf]) -> Result<Self> {
        let layers = dirs
            .iter()
            .map(|d| open_path_dir(d).map(Root::new))
            .collect::<Result<_>>()?;
        Ok(LowerView { layers })
    }

    fn root_state(&self) -> Result<DirState> {
        let mut active = Vec::new();
        for j in (0..self.layers.len()).rev() {
            active.push(j);
            let fd = openat(self.layers[j].fd(), ".", RD_DIR, Mode::empty())
                .ctx(|| "opening layer root".into())?;
            if is_opaque(&fd) {
                break;
            }
        }
        Ok(DirState {
            path: Vec::new(),
            active,
        })
    }

    /// Looks `name` up in the merged directory `st`.
    fn step(&mut self, st: &DirState, name: &[u8]) -> Result<Step> {
        let comps: Vec<&[u8]> = st.path.iter().map(Vec::as_slice).collect();
        let mut found = Vec::new();
        for &j in &st.active {
            // Each active layer has a real directory chain at this path (checked on the way).
            let Ok(dir) = self.layers[j].open_dir_owned(&comps, false) else {
                continue;
            };
            let s = match statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(s) => s,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e).ctx(|| "inspecting a lower layer".into()),
            };
            let ft = FileType::from_raw_mode(s.st_mode);
            if ft == FileType::Directory {
                found.push(j);
                let sub = openat(&dir, name, RD_DIR, Mode::empty())
                    .ctx(|| "opening a lower directory".into())?;
                if is_opaque(&sub) {
                    break;
                }
                continue;
            }
            if !found.is_empty() {
                break; // a non-directory below a directory is hidden by it
            }
            return Ok(match ft {
                FileType::CharacterDevice if s.st_rdev == 0 => Step::Missing, // whiteout
                FileType::Symlink => Step::Symlink(
                    readlinkat(&dir, name, Vec::new())
                        .ctx(|| "reading a lower symlink".into())?
                        .into_bytes(),
                ),
                _ => Step::Other,
            });
        }
        if found.is_empty() {
            return Ok(Step::Missing);
        }
        let mut path = st.path.clone();
        path.push(name.to_vec());
        Ok(Step::Dir(DirState {
            path,
            active: found,
        }))
    }

    /// The merged directory at a symlink-free path, if the layers below have one there.
    fn state_of(&mut self, path: &[Vec<u8>]) -> Result<Option<DirState>> {
        let mut st = self.root_state()?;
        for c in path {
            match self.step(&st, c)? {
                Step::Dir(s) => st = s,
                _ => return Ok(None),
            }
        }
        Ok(Some(st))
    }

    /// Where the symlink `target`, found in the directory `base`, leads inside the image:
    /// chroot-style, as containerd's `RootPath` does. Missing components are kept as names
    /// (the applier would create them); a non-directory on the way or a loop is an error.
    fn resolve(
        &mut self,
        base: &[Vec<u8>],
        base_state: Option<&DirState>,
        target: &[u8],
        shown: &[u8],
    ) -> Result<(Comps, Option<DirState>)> {
        let refuse =
            |reason: &str| StoreError::unsafe_entry(String::from_utf8_lossy(shown), reason);
        let mut links = 1;
        let mut todo: VecDeque<Vec<u8>> = VecDeque::new();
        push_link(&mut todo, target);
        let (mut canon, mut state) = if target.starts_with(b"/") {
            (Vec::new(), Some(self.root_state()?))
        } else {
            (base.to_vec(), base_state.cloned())
        };
        while let Some(c) = todo.pop_front() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    canon.pop(); // at the root, `..` is the root
                    state = self.state_of(&canon)?;
                    continue;
                }
                _ => {}
            }
            let next = match &state {
                None => Step::Missing,
                Some(s) => self.step(s, &c)?,
            };
            match next {
                Step::Dir(s) => {
                    canon.push(c);
                    state = Some(s);
                }
                Step::Missing => {
                    canon.push(c);
                    state = None;
                }
                Step::Other => {
                    return Err(refuse(
                        "path resolves through a non-directory of a lower layer",
                    ))
                }
                Step::Symlink(t) => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(refuse("path resolves through too many symlinks"));
                    }
                    if t.starts_with(b"/") {
                        canon.clear();
                        state = Some(self.root_state()?);
                    }
                    push_link(&mut todo, &t);
                }
            }
            if canon.len() > MAX_DEPTH {
                return Err(StoreError::LimitExceeded(format!(
                    "{:?} resolves deeper than {MAX_DEPTH}",
                    String::from_utf8_lossy(shown)
                )));
            }
        }
        Ok((canon, state))
    }

    /// A readable descriptor of the top-most lower directory of `st` (its metadata wins).
    fn top_dir(&mut self, st: &DirState) -> Result<OwnedFd> {
        let comps: Vec<&[u8]> = st.path.iter().map(Vec::as_slice).collect();
        let pfd = self.layers[st.active[0]]
            .open_dir_owned(&comps, false)
            .map_err(|e| StoreError::Invalid(format!("lower directory: {}", e.reason())))?;
        openat(&pfd, ".", RD_DIR, Mode::empty()).ctx(|| "opening a lower directory".into())
    }
}

/// Puts a link target's components in front of what is left to resolve.
fn push_link(todo: &mut VecDeque<Vec<u8>>, target: &[u8]) {
    for c in target.split(|&b| b == b'/').rev() {
        if !c.is_empty() {
            todo.push_front(c.to_vec());
        }
    }
}

fn is_opaque(dir: &OwnedFd) -> bool {
    let mut buf = [0u8; 4];
    matches!(fgetxattr(dir, OPAQUE, &mut buf[..]), Ok(1) if buf[0] == b'y')
}

/// Where a directory of the variant takes its owner, mode, xattrs and mtime from.
enum MetaFrom {
    /// The layer's own directory at this path.
    Layer(Comps),
    /// The top-most directory of the layers below at the variant's path, if any (the applier
    /// writes into it without changing it); a fresh 0755 directory otherwise.
    Below(Comps),
}

/// Builds one variant: the layer's tree walked once, every directory placed where the
/// appliers would have put its entries, every other entry hard-linked there.
struct Builder<'a> {
    view: &'a mut LowerView,
    implicit: &'a HashSet<&'a [u8]>,
    layer: Root,
    variant: Root,
    /// Variant directory -> (priority, source); a higher priority wins.
    metas: HashMap<Comps, (u8, MetaFrom)>,
}

impl Builder<'_> {
    fn run(&mut self) -> Result<()> {
        let lroot = openat(self.layer.fd(), ".", RD_DIR, Mode::empty())
            .ctx(|| "opening layer root".into())?;
        let vroot = openat(self.variant.fd(), ".", RD_DIR, Mode::empty())
            .ctx(|| "opening variant root".into())?;
        if is_opaque(&lroot) {
            set_opaque(&vroot)?;
        }
        self.set_meta(Vec::new(), 2, MetaFrom::Layer(Vec::new()));
        let root = self.view.root_state()?;
        self.dir(&lroot, &[], &[], Some(&root), &vroot, 0)?;
        self.apply_metas()
    }

    fn set_meta(&mut self, at: Comps, prio: u8, from: MetaFrom) {
        match self.metas.get(&at) {
            Some((p, _)) if *p > prio => {}
            _ => {
                self.metas.insert(at, (prio, from));
            }
        }
    }

    /// Places the entries of the layer directory `ldir` (at `lpath`) into the variant
    /// directory `vdir` at `at`, whose merged state below is `below`.
    fn dir(
        &mut self,
        ldir: &OwnedFd,
        lpath: &[Vec<u8>],
        at: &[Vec<u8>],
        below: Option<&DirState>,
        vdir: &OwnedFd,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(StoreError::LimitExceeded(format!(
                "tree deeper than {MAX_DEPTH}"
            )));
        }
        for (name, ft) in list(ldir)? {
            if ft != FileType::Directory {
                // The first entry to reach a name keeps it (the appliers' outcome would depend
                // on the tar order, which the unpacked layer no longer has).
                match linkat(
                    ldir,
                    name.as_slice(),
                    vdir,
                    name.as_slice(),
                    AtFlags::empty(),
                ) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => {
                        return Err(e).ctx(|| {
                            format!("linking {} into a variant", String::from_utf8_lossy(&name))
                        })
                    }
                }
                continue;
            }
            let mut lp = lpath.to_vec();
            lp.push(name.clone());
            let key = lp.join(&b'/');
            let mut direct = at.to_vec();
            direct.push(name.clone());
            let step = match below {
                None => Step::Missing,
                Some(st) => self.view.step(st, &name)?,
            };
            let (place, state) = match step {
                Step::Dir(s) => (direct, Some(s)),
                Step::Symlink(t) if self.implicit.contains(key.as_slice()) => {
                    self.view.resolve(at, below, &t, &key)?
                }
                // A directory entry replaces a symlink; anything else is shadowed as in overlayfs.
                Step::Symlink(_) | Step::Missing | Step::Other => (direct.clone(), None),
            };
            let relocated =
                place.len() != at.len() + 1 || place[..at.len()] != *at || place[at.len()] != name;
            let sub_l = openat(ldir, name.as_slice(), RD_DIR, Mode::empty())
                .ctx(|| format!("opening {}", String::from_utf8_lossy(&key)))?;
            let sub_v = self.ensure(&place)?;
            if is_opaque(&sub_l) {
                set_opaque(&sub_v)?;
            }
            if !relocated {
                self.set_meta(place.clone(), 2, MetaFrom::Layer(lp.clone()));
            } else if state.is_some() {
                self.set_meta(place.clone(), 1, MetaFrom::Below(place.clone()));
            } else {
                self.set_meta(place.clone(), 1, MetaFrom::Layer(lp.clone()));
            }
            self.dir(&sub_l, &lp, &place, state.as_ref(), &sub_v, depth + 1)?;
        }
        Ok(())
    }

    /// Opens the variant directory `at`, creating what is missing; a non-directory in the way
    /// (a link this layer placed there) gives way. Never follows a symlink.
    fn ensure(&mut self, at: &[Vec<u8>]) -> Result<OwnedFd> {
        let mut cur = openat(self.variant.fd(), ".", RD_DIR, Mode::empty())
            .ctx(|| "opening variant root".into())?;
        for (k, name) in at.iter().enumerate() {
            let name = name.as_slice();
            match openat(&cur, name, RD_DIR, Mode::empty()) {
                Ok(fd) => {
                    cur = fd;
                    continue;
                }
                Err(Errno::NOENT) => {}
                Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                    unlinkat(&cur, name, AtFlags::empty()).ctx(|| "unlinking in variant".into())?
                }
                Err(e) => return Err(e).ctx(|| "opening variant directory".into()),
            }
            mkdirat(&cur, name, Mode::from(0o700)).ctx(|| "creating variant directory".into())?;
            let made = at[..=k].to_vec();
            self.set_meta(made.clone(), 0, MetaFrom::Below(made));
            cur = openat(&cur, name, RD_DIR, Mode::empty())
                .ctx(|| "opening variant directory".into())?;
        }
        Ok(cur)
    }

    /// Gives every variant directory its owner, mode, xattrs and mtime, deepest first (after
    /// all links are made, so that the mtimes stay).
    fn apply_metas(&mut self) -> Result<()> {
        let mut jobs: Vec<(Comps, MetaFrom)> = self
            .metas
            .drain()
            .map(|(at, (_, from))| (at, from))
            .collect();
        jobs.sort_by_key(|(at, _)| Reverse(at.len()));
        for (at, from) in jobs {
            let comps: Vec<&[u8]> = at.iter().map(Vec::as_slice).collect();
            let vpath = self
                .variant
                .open_dir_owned(&comps, false)
                .map_err(|e| StoreError::Invalid(format!("variant directory: {}", e.reason())))?;
            let vdir = openat(&vpath, ".", RD_DIR, Mode::empty())
                .ctx(|| "opening variant directory".into())?;
            let src = match from {
                MetaFrom::Layer(lp) => {
                    let lc: Vec<&[u8]> = lp.iter().map(Vec::as_slice).collect();
                    let p = self.layer.open_dir_owned(&lc, false).map_err(|e| {
                        StoreError::Invalid(format!("layer directory: {}", e.reason()))
                    })?;
                    Some(
                        openat(&p, ".", RD_DIR, Mode::empty())
                            .ctx(|| "opening layer dir".into())?,
                    )
                }
                MetaFrom::Below(p) => match self.view.state_of(&p)? {
                    Some(s) => Some(self.view.top_dir(&s)?),
                    None => None,
                },
            };
            let is_root = at.is_empty();
            match src {
                Some(src) => copy_meta(&src, &vdir, is_root)?,
                None => fchmod(&vdir, Mode::from(0o755)).ctx(|| "chmod".into())?,
            }
        }
        Ok(())
    }
}

fn set_opaque(dir: &OwnedFd) -> Result<()> {
    fsetxattr(dir, OPAQUE, b"y", XattrFlags::empty()).ctx(|| "marking a directory opaque".into())
}

/// Owner, xattrs (not overlayfs' own), mode and mtime of `src` onto `dst`. The variant's root is
/// a store directory: never group- or world-writable, whatever the layer says.
fn copy_meta(src: &OwnedFd, dst: &OwnedFd, is_root: bool) -> Result<()> {
    let st = fstat(src).ctx(|| "stat".into())?;
    if rustix::process::geteuid().is_root() {
        fchown(
            dst,
            Some(Uid::from_raw(st.st_uid)),
            Some(Gid::from_raw(st.st_gid)),
        )
        .ctx(|| "chown".into())?;
    }
    copy_xattrs(src.as_fd(), dst.as_fd())?;
    let mut mode = st.st_mode & 0o7777;
    if is_root {
        mode &= !0o022 & 0o1777;
    }
    fchmod(dst, Mode::from_raw_mode(mode)).ctx(|| "chmod".into())?;
    let t = Timespec {
        tv_sec: st.st_mtime as _,
        tv_nsec: st.st_mtime_nsec as _,
    };
    futimens(
        dst,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
    )
    .ctx(|| "utimes".into())
}

fn list(dir: &OwnedFd) -> Result<Vec<(Vec<u8>, FileType)>> {
    let mut out = Vec::new();
    for ent in Dir::read_from(dir).ctx(|| "reading directory".into())? {
        let ent = ent.ctx(|| "reading directory".into())?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let mut ft = ent.file_type();
        if ft == FileType::Unknown {
            let st = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ctx(|| "stat".into())?;
            ft = FileType::from_raw_mode(st.st_mode);
        }
        out.push((name.to_vec(), ft));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flatten::{flatten, Materialise};
    use crate::gc::KeepSet;
    use crate::store::Policy;
    use crate::unpack::tests::{ingest_and_unpack, raw_tar, store, RawEntry};
    use tar::EntryType::{Directory as D, Regular as F, Symlink as L};

    /// Unpacks each layer and returns the chain's diff ids.
    fn chain(s: &Store, layers: &[&[RawEntry]]) -> Vec<Digest> {
        layers
            .iter()
            .map(|l| ingest_and_unpack(s, &raw_tar(l)).unwrap().diff_id)
            .collect()
    }

    /// The image as the chain's lower dirs show it, flattened into a directory.
    fn image(s: &Store, ids: &[Digest], dir: &Path) -> PathBuf {
        let out = dir.join(random_name("image-"));
        std::fs::create_dir(&out).unwrap();
        flatten(&s.chain_dirs(ids).unwrap(), &out, Materialise::HardLink).unwrap();
        out
    }

    fn link_of(p: &Path) -> PathBuf {
        std::fs::read_link(p).unwrap()
    }

    #[test]
    fn a_file_under_a_relative_symlinked_dir_lands_at_its_target() {
        let (s, dir) = store(Policy::default());
        let ids = chain(
            &s,
            &[
                &[
                    (D, "versions/", b"", ""),
                    (D, "versions/1/", b"", ""),
                    (F, "versions/1/old", b"o", ""),
                    (L, "cur", b"", "versions/1"),
                ],
                &[(F, "cur/file", b"new", "")],
            ],
        );
        let dirs = s.chain_dirs(&ids).unwrap();
        assert_eq!(dirs[0], s.layer_dir(&ids[0]).join("fs"));
        assert!(dirs[1].starts_with(dir.join("layers/chains")));
        // The shared layer itself is untouched; the variant holds its inode at the target.
        assert!(s.layer_dir(&ids[1]).join("fs/cur/file").is_file());
        assert!(!dirs[1].join("cur").exists());
        assert_eq!(
            std::fs::read(dirs[1].join("versions/1/file")).unwrap(),
            b"new"
        );
        let img = image(&s, &ids, &dir);
        assert_eq!(link_of(&img.join("cur")), Path::new("versions/1"));
        assert_eq!(std::fs::read(img.join("versions/1/file")).unwrap(), b"new");
        assert_eq!(std::fs::read(img.join("versions/1/old")).unwrap(), b"o");
        // Built once: the second call finds it.
        assert_eq!(s.chain_dirs(&ids).unwrap(), dirs);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_absolute_symlink_resolves_inside_the_image_root() {
        let (s, dir) = store(Policy::default());
        let ids = chain(
            &s,
            &[&[(L, "lib", b"", "/opt/x")], &[(F, "lib/y", b"why", "")]],
        );
        let img = image(&s, &ids, &dir);
        assert_eq!(link_of(&img.join("lib")), Path::new("/opt/x"));
        assert_eq!(std::fs::read(img.join("opt/x/y")).unwrap(), b"why");
        let mode = std::fs::metadata(s.chain_dirs(&ids).unwrap()[1].join("opt/x"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_directory_entry_replaces_the_symlink_and_needs_no_variant() {
        let (s, dir) = store(Policy::default());
        let ids = chain(
            &s,
            &[
                &[(D, "v/", b"", ""), (L, "cur", b"", "v")],
                &[(D, "cur/", b"", ""), (F, "cur/file", b"x", "")],
            ],
        );
        let dirs = s.chain_dirs(&ids).unwrap();
        assert_eq!(dirs[1], s.layer_dir(&ids[1]).join("fs"));
        let img = image(&s, &ids, &dir);
        assert!(img.join("cur").symlink_metadata().unwrap().is_dir());
        assert!(!img.join("v/file").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn implicit_dirs_over_real_dirs_need_no_variant() {
        let (s, dir) = store(Policy::default());
        let ids = chain(
            &s,
            &[
                &[(D, "usr/", b"", ""), (D, "usr/bin/", b"", "")],
                &[(F, "usr/bin/tool", b"t", "")],
            ],
        );
        assert_eq!(
            s.chain_dirs(&ids).unwrap()[1],
            s.layer_dir(&ids[1]).join("fs")
        );
        assert!(!dir.join("layers/chains").read_dir().unwrap().any(|_| true));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn whiteouts_and_links_to_links_follow_the_chain() {
        let (s, dir) = store(Policy::default());
        let ids = chain(
            &s,
            &[
                &[
                    (D, "real/", b"", ""),
                    (F, "real/gone", b"g", ""),
                    (F, "real/kept", b"k", ""),
                    (L, "a", b"", "b/"),
                    (L, "b", b"", "/c/../real"),
                ],
                &[(F, "a/.wh.gone", b"", ""), (F, "a/sub/new", b"n", "")],
                // A third layer sees the second one's variant and the same links.
                &[(F, "a/sub/third", b"3", "")],
            ],
        );
        let img = image(&s, &ids, &dir);
        assert!(!img.join("real/gone").exists());
        assert_eq!(std::fs::read(img.join("real/kept")).unwrap(), b"k");
        assert_eq!(std::fs::read(img.join("real/sub/new")).unwrap(), b"n");
        assert_eq!(std::fs::read(img.join("real/sub/third")).unwrap(), b"3");
        assert_eq!(link_of(&img.join("a")), Path::new("b/"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn hostile_links_never_lead_outside_the_variant() {
        let outside = std::env::temp_dir().join(random_name("bulkhead-canary-"));
        std::fs::create_dir(&outside).unwrap();
        let canary = outside.to_str().unwrap().to_string();
        let up = "../../../../../../../../..".to_string() + &canary;
        let cases: &[(&str, &str)] = &[
            (&up, &canary[1..]),
            (&canary, &canary[1..]),
            ("/../../etc", "etc"),
            ("../../../../../../etc", "etc"),
            ("/proc/self/root/etc", "proc/self/root/etc"),
        ];
        for (target, lands) in cases {
            let (s, dir) = store(Policy::default());
            let ids = chain(
                &s,
                &[&[(L, "evil", b"", target)], &[(F, "evil/pwned", b"x", "")]],
            );
            let img = image(&s, &ids, &dir);
            assert_eq!(
                std::fs::read(img.join(lands).join("pwned")).unwrap(),
                b"x",
                "{target}"
            );
            assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "{target}");
            std::fs::remove_dir_all(dir).unwrap();
        }
        std::fs::remove_dir_all(outside).unwrap();
    }

    #[test]
    fn loops_and_non_directories_are_refused_and_leave_nothing() {
        let cases: &[(&[RawEntry], &str)] = &[
            (
                &[(L, "a", b"", "b"), (L, "b", b"", "a")],
                "path resolves through too many symlinks",
            ),
            (
                &[(L, "a", b"", "a/x")],
                "path resolves through too many symlinks",
            ),
            (
                &[(L, "a", b"", "/a")],
                "path resolves through too many symlinks",
            ),
            (
                &[(F, "file", b"f", ""), (L, "a", b"", "file")],
                "path resolves through a non-directory of a lower layer",
            ),
        ];
        for (lower, reason) in cases {
            let (s, dir) = store(Policy::default());
            let ids = chain(&s, &[lower, &[(F, "a/x/y", b"", "")]]);
            match s.chain_dirs(&ids) {
                Err(StoreError::UnsafeEntry { path, reason: r }) => {
                    assert_eq!(path, "a");
                    assert_eq!(&r, reason);
                }
                other => panic!("{reason}: unexpected {other:?}"),
            }
            let left: Vec<_> = std::fs::read_dir(dir.join("layers/chains"))
                .unwrap()
                .collect();
            assert!(left.is_empty(), "{reason}: {left:?}");
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn gc_keeps_a_variant_while_its_layers_are_kept() {
        let (s, dir) = store(Policy::default());
        let ids = chain(&s, &[&[(L, "l", b"", "t")], &[(F, "l/f", b"", "")]]);
        let variant = s.chain_dirs(&ids).unwrap()[1]
            .parent()
            .unwrap()
            .to_path_buf();
        let keep = KeepSet {
            layers: ids.iter().cloned().collect(),
            ..Default::default()
        };
        s.gc(&keep, std::time::Duration::from_secs(3600)).unwrap();
        assert!(variant.join("meta").is_file());
        let keep = KeepSet {
            layers: [ids[1].clone()].into_iter().collect(),
            ..Default::default()
        };
        s.gc(&keep, std::time::Duration::from_secs(3600)).unwrap();
        assert!(!variant.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
