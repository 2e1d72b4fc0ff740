//! virtio-blk (id 2) backed by a raw image file, optionally read-only.
//!
//! Requests (IN, OUT, FLUSH, GET_ID) are served synchronously with positioned file I/O on the
//! device event-loop thread. That is simple and adequate for a root file system that is mostly
//! read through the guest's page cache; a slow disk stalls the other devices on the same loop,
//! so moving I/O to io_uring or a worker thread is the next step when that matters.

mod device;
mod event_handler;
mod persist;
mod request;

pub use device::{Block, BlockConfig, BlockError, SECTOR_SIZE};
pub use persist::BlockState;
