//! Guest-memory snapshots for Roost: the memory chain and the userfaultfd page server.
//!
//! A memory snapshot is a chain of generations (a full snapshot, then diffs holding only the
//! pages dirtied since their parent) plus a header mapping each page to the generation holding
//! it. This crate knows nothing about KVM: the VMM gives it pages and dirty sets; it gives the
//! VMM a chain to map or to serve. See `docs/memory-snapshots.md`.
//!
//! - [`format`]: the versioned, checksummed header.
//! - [`chain`]: opening and reading a chain, with per-page checksums.
//! - [`writer`]: writing a full or diff generation.
//! - [`merge`]: collapsing a chain deeper than a configured depth into one generation.
//! - [`server`]: the userfaultfd page server, its handshake with the VMM, working sets.
pub mod chain;
pub mod format;
pub mod merge;
pub mod server;
pub mod writer;

pub use chain::{Chain, ChainError, HEADER_FILE};
pub use format::{FormatError, Header, PageSource};
pub use merge::{DEFAULT_MAX_DEPTH, merge_if_deeper, merge_into};
pub use writer::{ChainWriter, WriteSummary, is_zero};

#[cfg(test)]
mod tests;
