//! virtio devices on the virtio-mmio transport (version 2, modern only).
//!
//! - [`VirtioDevice`] is the contract between a device model and its transport;
//!   [`MmioTransport`] is the register file the guest driver talks to, and implements the VM
//!   core's [`BusDevice`](crate::devices::bus::BusDevice).
//! - [`VirtioInterrupt`] holds the interrupt status and the irq eventfd.
//! - `block`, `net`, `rng` and `vsock` are the device models; each also implements
//!   `event_manager::MutEventSubscriber` and runs on the device event-loop thread.
//!
//! Queues are `virtio_queue::Queue` split rings; guest memory is `vm_memory::GuestMemoryMmap`.
//! Every device offers `VIRTIO_F_VERSION_1` and `VIRTIO_RING_F_EVENT_IDX` (see `queue_drain`).
//! The VM core wires them in `device_manager` (MMIO slots, irqfd, one ioeventfd per queue on
//! `QueueNotify`); see the crate README.

pub mod block;
pub mod device;
pub mod interrupt;
pub mod lifecycle;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod queue_drain;
pub(crate) mod ratelimit;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

pub use block::{Block, BlockConfig, BlockError, BlockState};
pub use device::{ActivateError, Activation, VirtioDevice};
pub use interrupt::{InterruptKind, VirtioInterrupt};
pub use mmio::{MmioError, MmioRestoreArgs, MmioRestoreError, MmioTransport, MmioTransportState};
pub use net::{Net, NetState};
pub use persist::{QueueSnapshot, VirtioDeviceState};
pub use rng::{Rng, RngError, RngState};
pub use vsock::{
    TransportResetError, Vsock, VsockConfig, VsockError, VsockRestoreArgs, VsockState,
};

use std::sync::{Arc, Mutex};

/// A new block device for the VM core's builder.
pub fn block(cfg: BlockConfig) -> Result<Arc<Mutex<Block>>, BlockError> {
    Ok(Arc::new(Mutex::new(Block::new(cfg)?)))
}

/// A new entropy device for the VM core's builder.
pub fn rng() -> Result<Arc<Mutex<Rng>>, RngError> {
    Ok(Arc::new(Mutex::new(Rng::new()?)))
}

/// `VIRTIO_F_VERSION_1` as a feature mask: every device offers it (modern transport only).
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX` as a feature mask: every device offers it (see `queue_drain`).
pub const FEATURE_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// A new network device for the VM core's builder; opens (or takes over) the tap now.
pub fn net(cfg: net::NetConfig) -> Result<Arc<Mutex<Net>>, net::NetError> {
    Ok(Arc::new(Mutex::new(Net::new(cfg)?)))
}

/// A new vsock device for the VM core's builder; listens on `cfg.uds_path` right away.
pub fn vsock(cfg: VsockConfig) -> Result<Arc<Mutex<Vsock>>, VsockError> {
    Ok(Arc::new(Mutex::new(Vsock::new(cfg)?)))
}
