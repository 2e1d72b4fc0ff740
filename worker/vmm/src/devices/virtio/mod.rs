//! virtio devices on the virtio-mmio transport (version 2, modern only).
//!
//! - [`VirtioDevice`] is the contract between a device model and its transport;
//!   [`MmioTransport`] is the register file the guest driver talks to, and implements the VM
//!   core's [`BusDevice`](crate::devices::bus::BusDevice).
//! - [`VirtioInterrupt`] holds the interrupt status and the irq eventfd.
//! - `block`, `rng` and `vsock` are the device models; each also implements
//!   `event_manager::MutEventSubscriber` and runs on the device event-loop thread.
//!
//! Queues are `virtio_queue::Queue` split rings; guest memory is `vm_memory::GuestMemoryMmap`.
//! The VM core's wiring is described in `helpers/VMM-INTERFACE.md` and the crate README.

pub mod device;
pub mod interrupt;
pub mod lifecycle;
pub mod mmio;
pub mod persist;
pub(crate) mod ratelimit;

pub use device::{ActivateError, Activation, VirtioDevice};
pub use interrupt::{InterruptKind, VirtioInterrupt};
pub use mmio::{MmioError, MmioTransport, MmioTransportState};
pub use persist::{QueueSnapshot, VirtioDeviceState};

/// `VIRTIO_F_VERSION_1` as a feature mask: every device offers it (modern transport only).
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
