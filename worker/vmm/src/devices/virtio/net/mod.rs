//! virtio-net (id 1): the guest's Ethernet link to a tap inside the sandbox's network
//! namespace (see `worker/net` and `docs/networking.md`).
//!
//! Deliberately plain: `VIRTIO_NET_F_MAC` plus the common ring features, no checksum/TSO
//! offloads and no mergeable rx buffers. Every frame is at most the tap's MTU (1500) plus its
//! Ethernet header, so it always fits the guest's small rx buffers (Linux posts 1518 + header
//! bytes each without `MRG_RXBUF`), the device holds at most one frame for a guest that has no
//! buffer (bounded memory), and the header the device writes is always zero. The price is
//! throughput: one descriptor chain per 1.5 KB frame (see `roost-bench net`).
//!
//! - `tap`: opening the tap by name or taking an inherited fd.
//! - `device`/`event_handler`: the rx (0) and tx (1) queues and the event loop.
//! - `persist`: snapshot state.

mod device;
mod event_handler;
mod persist;
pub mod tap;

pub use device::{HDR_LEN, MAX_FRAME, Net, NetConfig, NetCounters, NetError, TapSource};
pub use persist::{NetRestoreArgs, NetRestoreError, NetState};
