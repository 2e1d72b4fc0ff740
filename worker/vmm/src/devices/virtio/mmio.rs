//! The virtio-mmio transport, version 2 ("modern") only: the 0x100-byte register file followed
//! by the device configuration space, as the Linux `virtio_mmio` driver sees it.
//!
//! The transport owns the queue configuration until the driver sets `DRIVER_OK`; it then checks
//! every queue (ready, power-of-two size, rings inside guest memory) and hands copies of them to
//! the device. Invalid guest input never panics: bad accesses are ignored (and logged, rate
//! limited), an invalid queue setup makes the device set `DEVICE_NEEDS_RESET`.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::FEATURE_EVENT_IDX;
use super::device::{Activation, VirtioDevice};
use super::interrupt::{InterruptKind, VirtioInterrupt};
use super::persist::QueueSnapshot;
use super::ratelimit::guest_warn;
use crate::devices::bus::BusDevice;

/// "virt" in little endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2 (virtio 1.x).
const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("RST" + 0: Roost).
pub const VENDOR_ID: u32 = 0x0054_5352;
/// Size of the register window the VM core maps per device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue eventfd could not be created.
    #[error("cannot create a queue eventfd")]
    QueueEventFd(#[source] std::io::Error),
    /// The device declared an invalid maximum queue size.
    #[error("device queue {index} has invalid maximum size {max_size}")]
    QueueSize { index: usize, max_size: u16 },
}

/// Register state of the transport (for snapshots).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The `Status` register.
    pub device_status: u32,
    /// `DeviceFeaturesSel`.
    pub features_select: u32,
    /// `DriverFeaturesSel`.
    pub acked_features_select: u32,
    /// `QueueSel`.
    pub queue_select: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Queue configuration as the driver wrote it.
    pub queues: Vec<QueueSnapshot>,
    /// The `InterruptStatus` register.
    #[serde(default)]
    pub interrupt_status: u32,
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_status: u32,
    features_select: u32,
    acked_features_select: u32,
    queue_select: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_status", &self.device_status)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts `device` behind a register window; creates one eventfd per queue.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, MmioError> {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, &max_size) in max_sizes.iter().enumerate() {
            queues
                .push(Queue::new(max_size).map_err(|_| MmioError::QueueSize { index, max_size })?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::QueueEventFd)?);
        }
        Ok(Self {
            mem,
            device,
            interrupt,
            queues,
            queue_evts,
            device_status: 0,
            features_select: 0,
            acked_features_select: 0,
            queue_select: 0,
            config_generation: 0,
        })
    }

    /// One eventfd per queue; the VM core registers each as an ioeventfd on
    /// `base + 0x50` (`QueueNotify`) with the queue index as datamatch.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device's interrupt line.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Register state for snapshots.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_status: self.device_status,
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
            interrupt_status: self.interrupt.status(),
        }
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.device_status & set == set && self.device_status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let index = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(index)
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.features_select {
                    0 => low_half(features),
                    1 => high_half(features),
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().is_some_and(|q| q.ready()).into(),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.device_status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length reads as "none" (all ones).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                guest_warn!(
                    offset,
                    "virtio-mmio: read of unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let queue_config_allowed = self.has_status(
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
        );
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.acked_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if !self.has_status(
                    VIRTIO_CONFIG_S_DRIVER,
                    VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
                ) {
                    guest_warn!("virtio-mmio: driver features written in the wrong state");
                    return;
                }
                self.write_driver_features(value);
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify_queue(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if !queue_config_allowed {
                    guest_warn!(
                        offset,
                        "virtio-mmio: queue register written in the wrong state"
                    );
                    return;
                }
                let Some(queue) = self.selected_queue() else {
                    guest_warn!(
                        offset,
                        "virtio-mmio: queue register written for a missing queue"
                    );
                    return;
                };
                write_queue_register(queue, offset, value);
            }
            _ => guest_warn!(
                offset,
                "virtio-mmio: write of unknown or read-only register"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let mut device = lock(&self.device);
        let acked = device.acked_features();
        let new = match self.acked_features_select {
            0 => (acked & !0xffff_ffff) | u64::from(value),
            1 => (acked & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {
                guest_warn!("virtio-mmio: driver features page out of range");
                return;
            }
        };
        let avail = device.avail_features();
        if new & !avail != 0 {
            guest_warn!(
                unsupported = new & !avail,
                "virtio-mmio: driver acked features the device does not offer; ignored"
            );
        }
        device.set_acked_features(new & avail);
    }

    fn notify_queue(&mut self, value: u32) {
        match usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_evts.get(i))
        {
            Some(evt) => {
                if let Err(err) = evt.write(1) {
                    guest_warn!(%err, "virtio-mmio: cannot signal a queue eventfd");
                }
            }
            None => guest_warn!(value, "virtio-mmio: notify for a missing queue"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (section 3.1.1); anything else is a bug or hostile.
        if value & self.device_status != self.device_status {
            guest_warn!(
                old = self.device_status,
                new = value,
                "virtio-mmio: status bits cleared without reset; ignored"
            );
            return;
        }
        let added = value & !self.device_status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leave FEATURES_OK unset: the driver re-reads Status and gives up.
            self.device_status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.device_status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// Features are acceptable once `VIRTIO_F_VERSION_1` is acked: this transport is modern only.
    fn features_acceptable(&self) -> bool {
        let acked = lock(&self.device).acked_features();
        acked & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        let required = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if self.device_status & required != required {
            guest_warn!(
                status = self.device_status,
                "virtio-mmio: DRIVER_OK before FEATURES_OK"
            );
            self.needs_reset();
            return;
        }
        if let Some(index) = self.queues.iter().position(|q| !q.is_valid(&self.mem)) {
            guest_warn!(
                index,
                "virtio-mmio: driver set DRIVER_OK with an invalid queue"
            );
            self.needs_reset();
            return;
        }
        let event_idx = lock(&self.device).acked_features() & FEATURE_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut queue_evts = Vec::with_capacity(self.queue_evts.len());
        for (queue, evt) in self.queues.iter().zip(&self.queue_evts) {
            // A validated queue round-trips through its state without error.
            let Ok(mut copy) = Queue::try_from(queue.state()) else {
                self.needs_reset();
                return;
            };
            copy.set_event_idx(event_idx);
            let Ok(evt) = evt.try_clone() else {
                tracing::error!("virtio-mmio: cannot duplicate a queue eventfd");
                self.needs_reset();
                return;
            };
            queues.push(copy);
            queue_evts.push(evt);
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
        };
        let result = lock(&self.device).activate(activation);
        if result.is_ok() {
            tracing::debug!(
                device_type = lock(&self.device).device_type(),
                queues = self.queues.len(),
                "virtio device activated"
            );
        }
        if let Err(err) = result {
            tracing::error!(%err, "virtio-mmio: device activation failed");
            self.needs_reset();
        }
    }

    fn needs_reset(&mut self) {
        self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(err) = self.interrupt.trigger(InterruptKind::Config) {
            tracing::error!(%err, "virtio-mmio: cannot raise the config interrupt");
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        // Acked features are part of the device; a reset device starts negotiation afresh.
        lock(&self.device).set_acked_features(0);
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.clear();
        self.device_status = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.queue_select = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let config_offset = offset - u64::from(VIRTIO_MMIO_CONFIG);
            lock(&self.device).read_config(config_offset, data);
            return;
        }
        let (Ok(offset), Ok(bytes)) = (u32::try_from(offset), <&mut [u8; 4]>::try_from(&mut *data))
        else {
            guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register read must be 32-bit"
            );
            data.fill(0);
            return;
        };
        *bytes = self.read_register(offset).to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            if !self.has_status(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FAILED) {
                guest_warn!("virtio-mmio: config space written in the wrong state");
                return;
            }
            let config_offset = offset - u64::from(VIRTIO_MMIO_CONFIG);
            lock(&self.device).write_config(config_offset, data);
            return;
        }
        let (Ok(offset), Ok(bytes)) = (u32::try_from(offset), <[u8; 4]>::try_from(data)) else {
            guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register write must be 32-bit"
            );
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

fn write_queue_register(queue: &mut Queue, offset: u32, value: u32) {
    match offset {
        VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
            Ok(size) => queue.set_size(size),
            Err(_) => guest_warn!(value, "virtio-mmio: queue size out of range"),
        },
        VIRTIO_MMIO_QUEUE_READY => queue.set_ready(value == 1),
        VIRTIO_MMIO_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
        VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
        VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
        VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
        VIRTIO_MMIO_QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
        VIRTIO_MMIO_QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(value)),
        _ => {}
    }
}

fn low_half(value: u64) -> u32 {
    u32::try_from(value & 0xffff_ffff).unwrap_or(0)
}

fn high_half(value: u64) -> u32 {
    u32::try_from(value >> 32).unwrap_or(0)
}

/// Locks the device, recovering from poisoning: one panicked handler must not wedge every vCPU.
fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

mod persist;
pub use persist::{MmioRestoreArgs, MmioRestoreError};

#[cfg(test)]
mod tests;
