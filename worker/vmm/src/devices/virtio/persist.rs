//! Snapshot state shared by all virtio devices: negotiated features and queue positions, as
//! plain serde data. Each device's own `persist.rs` wraps this with its configuration; the
//! transport's register file is in [`super::mmio::MmioTransportState`].

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

/// The pure state of one split virtqueue (mirrors `virtio_queue::QueueState`, which is not
/// serde-able).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will consume.
    pub next_avail: u16,
    /// Next used-ring entry the device will produce.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub event_idx_enabled: bool,
}

impl From<&Queue> for QueueSnapshot {
    fn from(queue: &Queue) -> Self {
        Self {
            max_size: queue.max_size(),
            size: queue.size(),
            ready: queue.ready(),
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            event_idx_enabled: queue.event_idx_enabled(),
        }
    }
}

/// Feature negotiation and queue state of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// `VIRTIO_ID_*` of the device.
    pub device_type: u32,
    /// Features the device offers.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the device was running (queues handed over by the transport).
    pub activated: bool,
    /// The running queues (empty when not activated: the transport holds them then).
    pub queues: Vec<QueueSnapshot>,
}
