//! Bulkhead's content-addressed layer store.
//!
//! Pure Rust modules (tested with `cargo test`) plus `python.rs`, the only PyO3 surface, which
//! exposes them as the Python module `imaging._native`.

pub mod ahead;
pub mod backup;
pub mod chain;
pub mod diff;
pub mod digest;
pub mod error;
pub mod flatten;
pub mod gc;
pub mod ingest;
pub mod safepath;
pub mod store;
pub mod unpack;

#[cfg(all(feature = "python", not(test)))]
mod python;
