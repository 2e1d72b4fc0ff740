//! The contract between a virtio device model and its transport.
//!
//! The transport (virtio-mmio here) owns the register file and the queue configuration the
//! driver writes; once the driver sets `DRIVER_OK`, it hands the configured queues to the device
//! with [`VirtioDevice::activate`]. From then on the device runs on the device event-loop thread
//! (as an `event_manager::MutEventSubscriber`), woken by the queue eventfds.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::VirtioInterrupt;

/// Everything a device needs to start serving its queues.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory the queues live in.
    pub mem: GuestMemoryMmap,
    /// The driver's queues, validated by the transport (ready, sized, inside guest memory).
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver kicks that queue.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt line.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// The device is already running.
    #[error("device is already active")]
    AlreadyActive,
    /// Signalling the event loop failed.
    #[error("cannot signal the device event loop")]
    Signal(#[source] std::io::Error),
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted.
    fn acked_features(&self) -> u64;
    /// Records the driver's accepted features; the transport has already masked them with
    /// [`VirtioDevice::avail_features`].
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device configuration space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Whether [`VirtioDevice::activate`] succeeded since the last reset.
    fn is_activated(&self) -> bool;
    /// Returns the device to its pre-activation state (the driver wrote 0 to `Status`); the
    /// event loop drops the device's queue registrations on its next wake-up.
    fn reset(&mut self);
}

/// Copies `config[offset..]` into `data`, zero-filling what lies outside `config`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
