//! Deduplicated backups of a directory tree (issue 17), beside the layer store.
//!
//! A backup is a JSON manifest of the tree (paths, modes, owners, mtimes, symlinks, hard links)
//! whose regular files are lists of content-defined chunks (FastCDC 2020, ~1 MiB average). Each
//! chunk is compressed with zstd and stored once, named by the sha256 of its *uncompressed*
//! bytes, so a chunk is shared by every backup (of any volume) that contains it.
//!
//! ```text
//! root/chunks/<2 hex>/<64 hex>    one zstd frame per chunk
//! root/manifests/<64 hex>         a manifest, named by the sha256 of its JSON bytes
//! root/tmp/<random>               writes in progress (renamed into place when durable)
//! ```

pub mod chunks;
pub mod create;
pub mod export;
pub mod manifest;
pub mod restore;

pub use chunks::ChunkStore;
pub use manifest::{ChunkRef, Entry, Kind, Manifest, Name};

/// FastCDC parameters: files smaller than `MIN_CHUNK` are one chunk; big files are cut at
/// content-defined points between `MIN_CHUNK` and `MAX_CHUNK`, about every `AVG_CHUNK` bytes.
pub const MIN_CHUNK: usize = 256 << 10;
pub const AVG_CHUNK: usize = 1 << 20;
pub const MAX_CHUNK: usize = 4 << 20;

/// The largest chunk a manifest may name (ours are at most `MAX_CHUNK`); bounds the memory one
/// decompression can take whatever a hostile manifest says.
pub const MAX_CHUNK_ACCEPTED: u64 = 16 << 20;

#[cfg(test)]
mod tests;
