//! Garbage collection: remove what no image, workload or lease still names, and stale temps.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::digest::Digest;
use crate::error::{IoContext, Result};
use crate::store::{remove_any, Store};

/// What a collection removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed_blobs: u64,
    pub removed_layers: u64,
    pub removed_disks: u64,
    pub removed_temps: u64,
    pub freed_bytes: u64,
}

/// Names to keep; anything else is garbage.
#[derive(Clone, Debug, Default)]
pub struct KeepSet {
    pub blobs: HashSet<Digest>,
    pub layers: HashSet<Digest>,
    /// Chain ids of disks to keep.
    pub disks: HashSet<Digest>,
}

impl Store {
    /// Removes blobs, layers and disks not in `keep`, and temporaries older than `temp_age`
    /// (younger ones may belong to an import in progress).
    pub fn gc(&self, keep: &KeepSet, temp_age: Duration) -> Result<GcReport> {
        let mut r = GcReport::default();
        for (name, path) in entries(&self.sub("blobs/sha256"))? {
            if let Ok(d) = Digest::parse(&name) {
                if !keep.blobs.contains(&d) {
                    r.freed_bytes += tree_bytes(&path);
                    remove_any(&path).ctx(|| format!("removing {}", path.display()))?;
                    r.removed_blobs += 1;
                }
            }
        }
        for (name, path) in entries(&self.sub("layers/sha256"))? {
            if let Ok(d) = Digest::parse(&name) {
                if !keep.layers.contains(&d) {
                    r.freed_bytes += tree_bytes(&path);
                    remove_any(&path).ctx(|| format!("removing {}", path.display()))?;
                    r.removed_layers += 1;
                }
            }
        }
        // The blob -> diff id index is only a shortcut; drop entries that point at nothing.
        for (name, path) in entries(&self.sub("layers/by-blob"))? {
            let live = Digest::parse(&name).is_ok_and(|b| keep.blobs.contains(&b))
                && std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| Digest::parse(s.trim()).ok())
                    .is_some_and(|d| self.has_layer(&d));
            if !live && !name.starts_with(".tmp-") {
                remove_any(&path).ctx(|| format!("removing {}", path.display()))?;
            }
        }
        // A chain's variant of a layer lives as long as every layer of its chain.
        for (name, path) in entries(&self.sub("layers/chains"))? {
            if name.starts_with(".tmp-") {
                continue;
            }
            let ids: Vec<Option<Digest>> = std::fs::read_to_string(path.join("meta"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_prefix("diff_id="))
                .map(|v| Digest::parse(v).ok())
                .collect();
            let live = !ids.is_empty()
                && ids
                    .iter()
                    .all(|d| d.as_ref().is_some_and(|d| keep.layers.contains(d)));
            if !live {
                // Its files are hard links to the layers' inodes: nothing of their size is freed.
                remove_any(&path).ctx(|| format!("removing {}", path.display()))?;
                r.removed_layers += 1;
            }
        }
        for (name, path) in entries(&self.sub("disks"))? {
            if name.starts_with(".tmp-") {
                continue;
            }
            let hex = name.split('.').next().unwrap_or("");
            let keep_it = Digest::parse(hex).is_ok_and(|d| keep.disks.contains(&d));
            if !keep_it {
                r.freed_bytes += tree_bytes(&path);
                remove_any(&path).ctx(|| format!("removing {}", path.display()))?;
                r.removed_disks += 1;
            }
        }
        let now = SystemTime::now();
        for dir in [
            "ingest",
            "layers",
            "disks",
            "layers/by-blob",
            "layers/chains",
        ] {
            for (name, path) in entries(&self.sub(dir))? {
                let is_temp = dir == "ingest" || name.starts_with(".tmp-");
                if !is_temp {
                    continue;
                }
                let old = std::fs::symlink_metadata(&path)
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default() >= temp_age)
                    .unwrap_or(false);
                if old {
                    r.freed_bytes += tree_bytes(&path);
                    remove_any(&path).ctx(|| format!("removing {}", path.display()))?;
                    r.removed_temps += 1;
                }
            }
        }
        Ok(r)
    }
}

fn entries(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
        let e = e.ctx(|| format!("listing {}", dir.display()))?;
        out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
    }
    Ok(out)
}

/// Bytes used by a file or tree (apparent sizes; hard links counted once per name).
fn tree_bytes(path: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !m.is_dir() {
        return m.len();
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| tree_bytes(&e.path())).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{random_name, Limits, Policy};

    #[test]
    fn keeps_what_is_named_and_removes_the_rest() {
        let dir = std::env::temp_dir().join(random_name("bulkhead-gc-"));
        let s = Store::open(&dir, Policy::default(), Limits::default()).unwrap();
        let a = s.ingest_reader(&b"a"[..], None, None).unwrap().digest;
        let b = s.ingest_reader(&b"bb"[..], None, None).unwrap().digest;
        std::fs::write(dir.join("ingest/young"), b"partial").unwrap();
        let keep = KeepSet {
            blobs: [a.clone()].into_iter().collect(),
            ..Default::default()
        };
        let r = s.gc(&keep, Duration::from_secs(3600)).unwrap();
        assert_eq!(r.removed_blobs, 1);
        assert_eq!(r.freed_bytes, 2);
        assert!(s.has_blob(&a) && !s.has_blob(&b));
        assert!(
            dir.join("ingest/young").exists(),
            "young temp files belong to live imports"
        );
        let r = s.gc(&keep, Duration::ZERO).unwrap();
        assert_eq!(r.removed_temps, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
