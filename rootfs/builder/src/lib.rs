//! Builds Roost's guest artefacts — the microVM kernel and the root filesystem images — and
//! keeps them in a content-addressed cache so that each is rebuilt only when its inputs change.
//!
//! Every artefact has a [`cache::CacheKey`] computed from everything that shapes it (config
//! text, package lists, recipe version, tool versions, embedded binaries). A build runs in a
//! staging directory and is published atomically, so an interrupted build never leaves a
//! half-written artefact behind. The [`index`] records the most recently built artefact of each
//! name so that other tools (the host VM, tests, benchmarks) can find it without rebuilding.

pub mod cache;
pub mod index;
pub mod kernel;
pub mod progress;
pub mod rootfs;
pub mod run;

pub use cache::{Cache, CacheEntry, CacheError, CacheKey, CacheKeyBuilder, Origin};
pub use index::{Artefact, ArtefactIndex, IndexError};
pub use progress::{Progress, Task};
pub use run::{RunError, run_logged};

/// The outcome of ensuring one artefact exists.
#[derive(Debug, Clone)]
pub struct Built {
    /// The artefact, as recorded in the index.
    pub artefact: Artefact,
    /// Whether it came from the cache or was built now.
    pub origin: Origin,
    /// Wall time spent (hashing inputs for a cache hit, the whole build otherwise).
    pub duration: std::time::Duration,
}
