//! virtio-rng (entropy device, id 4): one queue whose device-writable buffers the device fills
//! from the host's `getrandom(2)`, so the guest has entropy from its first boot instruction
//! without waiting for its own pool.

mod device;
mod event_handler;
mod persist;

pub use device::{MAX_REQUEST_BYTES, Rng, RngError};
pub use persist::RngState;
