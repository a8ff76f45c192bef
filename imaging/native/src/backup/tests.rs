//! Backup, restore, verify and export against real directories.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::chunks::tests::scratch;
use super::manifest::{ChunkRef, Entry, Kind, Manifest, Name};
use super::restore::RestorePolicy;
use super::ChunkStore;
use crate::digest::Digest;
use crate::error::StoreError;
use crate::store::random_name;

/// Incompressible, reproducible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(random_name(&format!("bulkhead-{tag}-")));
    fs::create_dir_all(&d).unwrap();
    d
}

fn sample_tree() -> PathBuf {
    let d = tmpdir("src");
    fs::create_dir_all(d.join("db/base")).unwrap();
    fs::create_dir_all(d.join("empty")).unwrap();
    fs::write(d.join("db/base/big"), noise(1, 9 << 20)).unwrap();
    fs::write(d.join("db/base/small"), b"hello").unwrap();
    fs::write(d.join("db/zeros"), vec![0u8; 3 << 20]).unwrap();
    fs::write(d.join("empty-file"), b"").unwrap();
    fs::hard_link(d.join("db/base/small"), d.join("db/link-to-small")).unwrap();
    std::os::unix::fs::symlink("/etc", d.join("etc-link")).unwrap();
    std::os::unix::fs::symlink("base/small", d.join("db/rel")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        d.join("pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"name-\xff\xfe");
    fs::write(d.join(odd), b"not utf-8").unwrap();
    fs::set_permissions(d.join("db"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(d.join("db/base/small"), fs::Permissions::from_mode(0o600)).unwrap();
    d
}

use std::os::unix::ffi::OsStrExt;

/// (type, mode, size, content digest or link target) of every path under `root`.
fn describe(root: &Path) -> BTreeMap<Vec<u8>, (String, u32, u64, String, i64)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, (String, u32, u64, String, i64)>) {
        for ent in fs::read_dir(dir).unwrap() {
            let p = ent.unwrap().path();
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let (kind, what) = if ft.is_dir() {
                walk(root, &p, out);
                ("dir", String::new())
            } else if ft.is_symlink() {
                ("symlink", fs::read_link(&p).unwrap().display().to_string())
            } else if ft.is_file() {
                ("file", Digest::of(&fs::read(&p).unwrap()).to_string())
            } else {
                ("other", String::new())
            };
            let mtime = if ft.is_symlink() { 0 } else { m.mtime() };
            out.insert(
                rel,
                (
                    kind.into(),
                    m.mode() & 0o7777,
                    if ft.is_dir() { 0 } else { m.len() },
                    what,
                    mtime,
                ),
            );
        }
    }
    walk(root, root, &mut out);
    out
}

#[test]
fn a_tree_round_trips_through_backup_and_restore() {
    let (s, store_dir) = scratch("bk");
    let src = sample_tree();
    let stats = s.backup(&src, None, None).unwrap();
    assert_eq!(stats.bytes_read, (9 << 20) + 5 + (3 << 20) + 9);
    let m = s
        .manifest(&Digest::parse(&stats.manifest).unwrap())
        .unwrap();
    let link = m
        .entries
        .iter()
        .find(|e| e.path.0 == b"db/link-to-small")
        .unwrap();
    assert_eq!(link.kind, Kind::Hardlink);
    let dest = tmpdir("dest");
    let r = s
        .restore(&m, &dest, RestorePolicy::default(), None)
        .unwrap();
    assert_eq!(r.files, 5);
    assert_eq!(describe(&src), describe(&dest));
    assert_eq!(
        fs::metadata(dest.join("db/base/small")).unwrap().ino(),
        fs::metadata(dest.join("db/link-to-small")).unwrap().ino()
    );
    // The all-zero file came back sparse.
    assert!(fs::metadata(dest.join("db/zeros")).unwrap().blocks() < 64);
    for d in [src, dest, store_dir] {
        fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn a_second_backup_of_an_unchanged_tree_writes_and_reads_nothing() {
    let (s, store_dir) = scratch("bk");
    let src = sample_tree();
    let first = s.backup(&src, None, None).unwrap();
    assert!(first.new_chunks > 0);
    let prev = Digest::parse(&first.manifest).unwrap();
    let again = s.backup(&src, Some(&prev), None).unwrap();
    assert_eq!(again.new_chunk_bytes, 0);
    assert_eq!(
        again.bytes_read,
        0,
        "{again:?} {}",
        String::from_utf8_lossy(
            &s.manifest_bytes(&Digest::parse(&again.manifest).unwrap())
                .unwrap()
        )
    );
    assert_eq!(again.files_unchanged, 6); // both names of the hard-linked file
    assert_eq!(again.manifest, first.manifest);
    // Without the previous manifest everything is read, and still nothing new is written.
    let cold = s.backup(&src, None, None).unwrap();
    assert_eq!(cold.new_chunk_bytes, 0);
    assert_eq!(cold.manifest, first.manifest);
    for d in [src, store_dir] {
        fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn one_changed_region_writes_about_that_much() {
    let (s, store_dir) = scratch("bk");
    let src = tmpdir("src");
    let mut data = noise(7, 64 << 20);
    fs::write(src.join("disk"), &data).unwrap();
    let first = s.backup(&src, None, None).unwrap();
    data[20 << 20..24 << 20].copy_from_slice(&noise(8, 4 << 20));
    fs::write(src.join("disk"), &data).unwrap();
    let prev = Digest::parse(&first.manifest).unwrap();
    let second = s.backup(&src, Some(&prev), None).unwrap();
    assert_eq!(second.bytes_read, 64 << 20);
    // The 4 MiB region plus at most the chunks that straddle its two edges.
    assert!(second.new_raw_bytes >= 4 << 20, "{second:?}");
    assert!(
        second.new_raw_bytes <= (4 << 20) + 2 * (super::MAX_CHUNK as u64),
        "{second:?}"
    );
    for d in [src, store_dir] {
        fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn a_backup_never_follows_a_symlink_out_of_the_tree() {
    let (s, store_dir) = scratch("bk");
    let outside = tmpdir("outside");
    fs::write(outside.join("secret"), b"host secret").unwrap();
    let src = tmpdir("src");
    std::os::unix::fs::symlink(&outside, src.join("dir-link")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), src.join("file-link")).unwrap();
    let stats = s.backup(&src, None, None).unwrap();
    assert_eq!(stats.bytes_read, 0);
    assert_eq!(stats.new_chunks, 0);
    let m = s
        .manifest(&Digest::parse(&stats.manifest).unwrap())
        .unwrap();
    assert!(m.entries.iter().skip(1).all(|e| e.kind == Kind::Symlink));
    for d in [src, outside, store_dir] {
        fs::remove_dir_all(d).unwrap();
    }
}

fn entry(path: &[u8], kind: Kind) -> Entry {
    Entry {
        path: Name(path.to_vec()),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
        size: 0,
        chunks: vec![],
        target: None,
        seen: None,
    }
}

fn hostile(entries: Vec<Entry>) -> Manifest {
    Manifest {
        version: super::manifest::VERSION,
        chunking: String::new(),
        totals: Default::default(),
        entries,
    }
}

fn stored_chunk(s: &ChunkStore, data: &[u8]) -> ChunkRef {
    let b = super::chunks::ChunkBatch::new(s);
    let (d, put) = b.put(data).unwrap();
    b.publish().unwrap();
    ChunkRef(d.hex().to_string(), data.len() as u64, put.stored_len)
}

#[test]
fn a_hostile_manifest_cannot_write_outside_the_target() {
    let (s, store_dir) = scratch("bk");
    let outside = tmpdir("outside");
    let c = stored_chunk(&s, b"owned");
    let mut file = entry(b"l/owned", Kind::File);
    file.size = 5;
    file.chunks = vec![c.clone()];
    let mut link = entry(b"l", Kind::Symlink);
    link.target = Some(Name(outside.as_os_str().as_bytes().to_vec()));
    let mut dotdot = entry(b"../owned", Kind::File);
    dotdot.size = 5;
    dotdot.chunks = vec![c.clone()];
    let mut hard = entry(b"h", Kind::Hardlink);
    hard.target = Some(Name(b"/etc/passwd".to_vec()));
    for m in [
        hostile(vec![link.clone(), file.clone()]),
        hostile(vec![entry(b"d", Kind::Dir), dotdot]),
        hostile(vec![hard]),
    ] {
        let dest = tmpdir("dest");
        let err = s
            .restore(&m, &dest, RestorePolicy::default(), None)
            .unwrap_err();
        assert!(matches!(err, StoreError::UnsafeEntry { .. }), "{err}");
        assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
        fs::remove_dir_all(dest).unwrap();
    }
    // Even past validation (a symlink planted in the target by someone else), the restore
    // resolves parents without following it.
    let dest = tmpdir("dest");
    let m = hostile(vec![file]);
    let r = std::thread::scope(|sc| {
        std::os::unix::fs::symlink(&outside, dest.join("l")).unwrap();
        sc.spawn(|| {
            // The target is no longer empty, which restore refuses up front.
            s.restore(&m, &dest, RestorePolicy::default(), None)
        })
        .join()
        .unwrap()
    });
    assert!(r.is_err());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    for d in [dest, outside, store_dir] {
        fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn a_corrupt_chunk_fails_the_restore_and_leaves_the_target_empty() {
    let (s, store_dir) = scratch("bk");
    let src = sample_tree();
    let stats = s.backup(&src, None, None).unwrap();
    let m = s
        .manifest(&Digest::parse(&stats.manifest).unwrap())
        .unwrap();
    let small = Digest::of(b"hello");
    fs::write(
        s.chunk_path(&small),
        zstd::bulk::compress(b"jello", 3).unwrap(),
    )
    .unwrap();
    let dest = tmpdir("dest");
    let err = s
        .restore(&m, &dest, RestorePolicy::default(), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
    // verify names exactly the bad chunk, and a missing one.
    let big = &m
        .entries
        .iter()
        .find(|e| e.path.0 == b"db/base/big")
        .unwrap()
        .chunks[0];
    fs::remove_file(s.chunk_path(&Digest::parse(&big.0).unwrap())).unwrap();
    let report = s.verify(&m);
    let mut bad: Vec<(String, String)> = report
        .bad
        .iter()
        .map(|b| (b.digest.clone(), b.reason.clone()))
        .collect();
    bad.sort();
    let mut want = vec![
        (small.to_string(), "content does not match".to_string()),
        (format!("sha256:{}", big.0), "missing".to_string()),
    ];
    want.sort();
    assert_eq!(bad, want);
    for d in [src, dest, store_dir] {
        fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn setid_bits_are_stripped_unless_allowed() {
    let (s, store_dir) = scratch("bk");
    let c = stored_chunk(&s, b"#!/bin/sh\n");
    let mut f = entry(b"suid", Kind::File);
    f.mode = 0o4755;
    f.size = 10;
    f.chunks = vec![c];
    let m = hostile(vec![f]);
    let dest = tmpdir("dest");
    s.restore(&m, &dest, RestorePolicy::default(), None)
        .unwrap();
    assert_eq!(
        fs::metadata(dest.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    for d in [dest, store_dir] {
        fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn an_export_is_a_tar_zst_of_the_tree() {
    let (s, store_dir) = scratch("bk");
    let src = sample_tree();
    let stats = s.backup(&src, None, None).unwrap();
    let m = s
        .manifest(&Digest::parse(&stats.manifest).unwrap())
        .unwrap();
    let mut out = Vec::new();
    let n = s.export_tar(&m, &mut out, 3).unwrap();
    assert_eq!(n, out.len() as u64);
    let mut a = tar::Archive::new(zstd::Decoder::new(&out[..]).unwrap());
    let mut seen = BTreeMap::new();
    for ent in a.entries().unwrap() {
        let mut ent = ent.unwrap();
        let path = ent.path_bytes().into_owned();
        let kind = ent.header().entry_type();
        let mut data = Vec::new();
        ent.read_to_end(&mut data).unwrap();
        seen.insert(path, (kind, data));
    }
    assert_eq!(seen[&b"db/base/big".to_vec()].1, noise(1, 9 << 20));
    assert_eq!(seen[&b"db/base/small".to_vec()].1, b"hello");
    assert_eq!(seen[&b"db/link-to-small".to_vec()].0, tar::EntryType::Link);
    assert_eq!(seen[&b"etc-link".to_vec()].0, tar::EntryType::Symlink);
    assert_eq!(seen[&b"pipe".to_vec()].0, tar::EntryType::Fifo);
    assert!(seen.contains_key(b"name-\xff\xfe".as_slice()));
    // A missing chunk fails the export instead of writing a short file.
    let big = &m
        .entries
        .iter()
        .find(|e| e.path.0 == b"db/base/big")
        .unwrap()
        .chunks[1];
    fs::remove_file(s.chunk_path(&Digest::parse(&big.0).unwrap())).unwrap();
    assert!(s.export_tar(&m, std::io::sink(), 3).is_err());
    for d in [src, store_dir] {
        fs::remove_dir_all(d).unwrap();
    }
}
