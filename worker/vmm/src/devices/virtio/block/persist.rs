//! Snapshot state of the block device: features, queue positions and the backing image
//! configuration (the image contents are the image file itself).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::Block;
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::persist::VirtioDeviceState;

/// Everything needed to recreate a [`Block`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Feature negotiation and queues.
    pub virtio: VirtioDeviceState,
    /// The image path.
    pub path: PathBuf,
    /// Whether the disk is read-only.
    pub read_only: bool,
    /// Capacity the guest saw, in 512-byte sectors (a restore must find the same size).
    pub capacity_sectors: u64,
}

impl Block {
    /// The device's snapshot state.
    pub fn state(&self) -> BlockState {
        BlockState {
            virtio: VirtioDeviceState {
                device_type: self.device_type(),
                avail_features: self.avail_features(),
                acked_features: self.acked_features,
                activated: self.lifecycle.is_active(),
                queues: self.lifecycle.queue_snapshots(),
            },
            path: self.config.path.clone(),
            read_only: self.config.read_only,
            capacity_sectors: self.capacity_sectors(),
        }
    }
}
