//! virtio-blk (id 2) backed by a raw image file (optionally read-only) or by a copy-on-write
//! overlay over a read-only base image (see [`overlay`]), whose changes a snapshot saves as
//! disk layers (see [`layer`]).
//!
//! Requests (IN, OUT, FLUSH, GET_ID) are served synchronously with positioned file I/O on the
//! device event-loop thread. That is simple and adequate for a root file system that is mostly
//! read through the guest's page cache; a slow disk stalls the other devices on the same loop,
//! so moving I/O to io_uring or a worker thread is the next step when that matters.

mod backend;
mod device;
mod event_handler;
pub mod layer;
pub mod overlay;
mod persist;
mod request;

pub use device::{Block, BlockConfig, BlockError, SECTOR_SIZE};
pub use layer::{DiskLayer, DiskManifest, LayerError, LayerKind};
pub use persist::{BlockState, LAYER_FILE, ReopenError, SnapshotDiskError};
