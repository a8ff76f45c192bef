//! The store's error type. Each variant maps to one Python exception in `python.rs`, so callers
//! never have to parse a message.

use std::io;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An operating-system call failed; `context` says what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Content did not hash to the digest the caller (or the manifest) promised.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// Content was not the size the caller promised.
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    /// An archive entry that would be unsafe to materialise (escape, device, link out, ...).
    #[error("unsafe entry {path:?}: {reason}")]
    UnsafeEntry { path: String, reason: String },
    /// A configured limit (size, entries, name length, ratio) was exceeded.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// Input that is not what it claims to be (bad digest string, unknown media type, ...).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A referenced blob or layer is not in the store.
    #[error("not found: {0}")]
    NotFound(String),
    /// An external tool (mkfs.erofs, mkfs.ext4) failed.
    #[error("{tool} failed: {message}")]
    Tool { tool: String, message: String },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Builds an `UnsafeEntry` error.
    pub fn unsafe_entry(path: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::UnsafeEntry {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Attaches a human-readable context to I/O errors, keeping the source.
pub trait IoContext<T> {
    /// Wraps an I/O error with `context`, computed only on failure.
    fn ctx<F: FnOnce() -> String>(self, context: F) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, context: F) -> Result<T> {
        self.map_err(|source| {
            // Our own readers smuggle typed errors (limits, unsafe entries) through io::Error.
            match source.downcast::<StoreError>() {
                Ok(inner) => inner,
                Err(source) => StoreError::Io {
                    context: context(),
                    source,
                },
            }
        })
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, context: F) -> Result<T> {
        self.map_err(|e| StoreError::Io {
            context: context(),
            source: e.into(),
        })
    }
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> Self {
        io::Error::other(e)
    }
}
