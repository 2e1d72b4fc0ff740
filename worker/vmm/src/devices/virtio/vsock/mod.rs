//! virtio-vsock (id 19): stream sockets between the guest and host Unix sockets.
//!
//! - [`packet`]: wire constants and a plain header (descriptor parsing is the rust-vmm
//!   `virtio-vsock` crate's `VsockPacket`).
//! - [`connection`]: the per-connection state machine with credit-based flow control.
//! - [`muxer`]: the host side, one Unix socket per VM with Firecracker's hybrid-vsock contract
//!   (`CONNECT <port>\n` → `OK <hostport>\n`; guest connections to port P reach
//!   `<uds_path>_<P>`).
//! - `device`/`event_handler`: the virtio queues (rx 0, tx 1, event 2) and the event loop.
//! - `persist`: snapshot state; live connections do not survive a snapshot (see there).

pub mod connection;
mod device;
mod event_handler;
mod host_connect;
pub mod muxer;
pub mod packet;
mod persist;

pub use device::{Vsock, VsockConfig, VsockError};

#[cfg(test)]
mod tests;
pub use persist::{TransportResetError, VsockRestoreArgs, VsockState};
