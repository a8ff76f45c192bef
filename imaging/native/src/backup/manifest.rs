//! The backup manifest: a JSON document listing a tree's entries in walk order (parents before
//! children, names sorted bytewise), each regular file with its chunks.
//!
//! A manifest read back (from our own store, or fetched through the portal) is treated as
//! hostile: `Manifest::parse` checks every name, digest, size and link before anything is
//! written, so a bad manifest is refused with nothing changed.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::MAX_CHUNK_ACCEPTED;
use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::safepath::{split_name, NameError};

/// Current manifest format.
pub const VERSION: u32 = 1;

/// A path or link target: raw bytes (Linux names need not be UTF-8). Serialised as a string when
/// it is UTF-8 and as `{"hex": "..."}` otherwise, so the JSON stays valid either way.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Name(pub Vec<u8>);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum NameRepr {
    Text(String),
    Raw { hex: String },
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(t) => NameRepr::Text(t.to_string()).serialize(s),
            Err(_) => NameRepr::Raw {
                hex: hex::encode(&self.0),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match NameRepr::deserialize(d)? {
            NameRepr::Text(t) => Ok(Name(t.into_bytes())),
            NameRepr::Raw { hex } => hex::decode(hex).map(Name).map_err(serde::de::Error::custom),
        }
    }
}

impl Name {
    /// For messages.
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A hard link to an earlier `file` entry (`target` is that entry's path).
    Hardlink,
    Fifo,
}

/// One chunk of a file: `[sha256 hex of the uncompressed bytes, uncompressed length, stored
/// (compressed) length]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef(pub String, pub u64, pub u64);

/// One entry of the tree. `path` is relative to the backed-up directory; the empty path is that
/// directory itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub path: Name,
    #[serde(rename = "type")]
    pub kind: Kind,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Modification time: seconds and nanoseconds.
    #[serde(default)]
    pub mtime: (i64, u32),
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Name>,
    /// (inode, ctime seconds, ctime nanoseconds) of the source file: the next backup reuses the
    /// chunk list of a file whose size, mtime and these are unchanged, without reading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<(u64, i64, u32)>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Totals kept in the manifest so a listing need not add them up.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
}

/// A whole backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub chunking: String,
    pub totals: Totals,
    pub entries: Vec<Entry>,
}

/// Bounds on what a manifest may ask a restore to create.
#[derive(Clone, Copy, Debug)]
pub struct RestoreLimits {
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl Default for RestoreLimits {
    fn default() -> Self {
        RestoreLimits {
            max_entries: 10_000_000,
            max_bytes: 16 << 40,
        }
    }
}

fn bad(path: &Name, reason: impl Into<String>) -> StoreError {
    StoreError::unsafe_entry(path.shown(), reason)
}

/// Splits and checks a manifest path (no `..`, not absolute, no NUL, bounded length).
pub fn components(name: &Name) -> Result<Vec<&[u8]>> {
    split_name(&name.0, 4096).map_err(|e| match e {
        NameError::Unsafe(why) => bad(name, why),
        NameError::TooLong => bad(name, "name too long or too deep"),
    })
}

impl Manifest {
    /// Serialises to JSON bytes (the bytes whose sha256 names the manifest).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| StoreError::Invalid(format!("manifest: {e}")))
    }

    /// Parses and validates a manifest from untrusted bytes.
    pub fn parse(json: &[u8], limits: RestoreLimits) -> Result<Self> {
        let m: Manifest = serde_json::from_slice(json)
            .map_err(|e| StoreError::Invalid(format!("not a backup manifest: {e}")))?;
        m.validate(limits)?;
        Ok(m)
    }

    /// Checks every entry: safe unique names, a parent that is a directory entry of this
    /// manifest (or implied), chunk digests and sizes that add up, hard links to earlier files.
    pub fn validate(&self, limits: RestoreLimits) -> Result<()> {
        if self.version != VERSION {
            return Err(StoreError::Invalid(format!(
                "unsupported manifest version {}",
                self.version
            )));
        }
        if self.entries.len() as u64 > limits.max_entries {
            return Err(StoreError::LimitExceeded(format!(
                "manifest has more than {} entries",
                limits.max_entries
            )));
        }
        let mut seen: HashSet<Vec<u8>> = HashSet::with_capacity(self.entries.len());
        let mut non_dirs: HashSet<Vec<u8>> = HashSet::new();
        let mut files: HashSet<Vec<u8>> = HashSet::new();
        let mut total: u64 = 0;
        for e in &self.entries {
            let comps = components(&e.path)?;
            let key = comps.join(&b'/');
            if comps.is_empty() && e.kind != Kind::Dir {
                return Err(bad(&e.path, "the root must be a directory"));
            }
            // A child of a symlink, file, ... would have to be created through it.
            for i in 1..comps.len() {
                if non_dirs.contains(&comps[..i].join(&b'/')) {
                    return Err(bad(&e.path, "parent is not a directory"));
                }
            }
            if !seen.insert(key.clone()) {
                return Err(bad(&e.path, "duplicate entry"));
            }
            if e.mode & !0o7777 != 0 {
                return Err(bad(&e.path, "mode has bits beyond 0o7777"));
            }
            match e.kind {
                Kind::Dir | Kind::Fifo => {
                    if e.size != 0 || !e.chunks.is_empty() || e.target.is_some() {
                        return Err(bad(&e.path, "only files have data"));
                    }
                }
                Kind::File => {
                    if e.target.is_some() {
                        return Err(bad(&e.path, "a file has no link target"));
                    }
                    let mut sum: u64 = 0;
                    for c in &e.chunks {
                        Digest::parse(&c.0)?;
                        if c.1 == 0 || c.1 > MAX_CHUNK_ACCEPTED {
                            return Err(bad(&e.path, "chunk length out of range"));
                        }
                        if c.2 > c.1 + c.1 / 8 + 1024 {
                            return Err(bad(&e.path, "stored chunk larger than zstd allows"));
                        }
                        sum = sum.saturating_add(c.1);
                    }
                    if sum != e.size {
                        return Err(bad(&e.path, "chunk lengths do not add up to the size"));
                    }
                    total = total.saturating_add(sum);
                    if total > limits.max_bytes {
                        return Err(StoreError::LimitExceeded(format!(
                            "manifest restores more than {} bytes",
                            limits.max_bytes
                        )));
                    }
                    files.insert(key.clone());
                }
                Kind::Symlink => {
                    let t = e
                        .target
                        .as_ref()
                        .ok_or_else(|| bad(&e.path, "symlink without a target"))?;
                    if t.0.is_empty() || t.0.len() > 4096 || t.0.contains(&0) {
                        return Err(bad(&e.path, "bad symlink target"));
                    }
                    if e.size != 0 || !e.chunks.is_empty() {
                        return Err(bad(&e.path, "only files have data"));
                    }
                }
                Kind::Hardlink => {
                    let t = e
                        .target
                        .as_ref()
                        .ok_or_else(|| bad(&e.path, "hard link without a target"))?;
                    let tkey = components(t)?.join(&b'/');
                    if !files.contains(&tkey) {
                        return Err(bad(&e.path, "hard link to something not an earlier file"));
                    }
                    if e.size != 0 || !e.chunks.is_empty() {
                        return Err(bad(&e.path, "only files have data"));
                    }
                }
            }
            if e.kind != Kind::Dir {
                non_dirs.insert(key);
            }
        }
        Ok(())
    }

    /// Each distinct chunk once: (digest, uncompressed length, stored length).
    pub fn distinct_chunks(&self) -> Vec<(Digest, u64, u64)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for e in &self.entries {
            for c in &e.chunks {
                if seen.insert(c.0.as_str()) {
                    if let Ok(d) = Digest::parse(&c.0) {
                        out.push((d, c.1, c.2));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: Name(path.as_bytes().to_vec()),
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

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            version: VERSION,
            chunking: String::new(),
            totals: Totals::default(),
            entries,
        }
    }

    fn refused(m: &Manifest) -> String {
        match m.validate(RestoreLimits::default()) {
            Err(StoreError::UnsafeEntry { reason, .. }) => reason,
            Err(other) => other.to_string(),
            Ok(()) => panic!("accepted"),
        }
    }

    #[test]
    fn names_round_trip_as_text_or_hex() {
        let m = manifest(vec![entry("a", Kind::Dir), {
            let mut e = entry("", Kind::Fifo);
            e.path = Name(vec![b'a', b'/', 0xff, 0xfe]);
            e
        }]);
        let json = m.to_json().unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(r#""hex":"612ffffe""#), "{text}");
        let back = Manifest::parse(&json, RestoreLimits::default()).unwrap();
        assert_eq!(back.entries[1].path.0, vec![b'a', b'/', 0xff, 0xfe]);
    }

    #[test]
    fn hostile_names_and_links_are_refused() {
        assert!(refused(&manifest(vec![entry("../x", Kind::Dir)])).contains("parent"));
        assert!(refused(&manifest(vec![entry("/etc", Kind::Dir)])).contains("absolute"));
        assert!(refused(&manifest(vec![
            entry("a", Kind::Dir),
            entry("a", Kind::Fifo)
        ]))
        .contains("duplicate"));
        let mut link = entry("l", Kind::Symlink);
        link.target = Some(Name(b"/etc".to_vec()));
        assert!(
            refused(&manifest(vec![link.clone(), entry("l/passwd", Kind::Fifo)]))
                .contains("not a directory")
        );
        let mut hl = entry("h", Kind::Hardlink);
        hl.target = Some(Name(b"../../etc/shadow".to_vec()));
        assert!(refused(&manifest(vec![hl.clone()])).contains("parent"));
        hl.target = Some(Name(b"later".to_vec()));
        assert!(refused(&manifest(vec![hl, entry("later", Kind::File)])).contains("earlier"));
        let mut f = entry("f", Kind::File);
        f.size = 10;
        f.chunks = vec![ChunkRef("ab".into(), 10, 10)];
        assert!(refused(&manifest(vec![f.clone()])).contains("digest"));
        f.chunks = vec![ChunkRef("a".repeat(64), 5, 5)];
        assert!(refused(&manifest(vec![f.clone()])).contains("add up"));
        f.chunks = vec![ChunkRef("a".repeat(64), 64 << 20, 5)];
        f.size = 64 << 20;
        assert!(refused(&manifest(vec![f])).contains("out of range"));
        let mut m = entry("x", Kind::Dir);
        m.mode = 0o170000;
        assert!(refused(&manifest(vec![m])).contains("mode"));
        assert!(refused(&manifest(vec![entry("", Kind::File)])).contains("root"));
    }

    #[test]
    fn limits_are_enforced() {
        let m = manifest(vec![entry("a", Kind::Dir), entry("b", Kind::Dir)]);
        let limits = RestoreLimits {
            max_entries: 1,
            max_bytes: 1,
        };
        assert!(matches!(
            m.validate(limits),
            Err(StoreError::LimitExceeded(_))
        ));
    }
}
