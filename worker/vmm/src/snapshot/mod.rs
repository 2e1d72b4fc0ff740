//! Snapshots of a running VM and restoring them in a new process.
//!
//! - [`persist`]: the one trait every device implements (`save` / `restore`).
//! - [`file`]: framing of `vm.state` (magic, format version, length, SHA-256, size limit).
//!
//! A snapshot directory holds `vm.state` (this module) next to the memory files (the memory
//! module's) and disk files (the block device's); see `docs/snapshot-format.md`.

pub mod file;
pub mod persist;

pub use persist::Persist;

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
