//! Snapshot state of the entropy device: features and queue positions (it has no other state).

use serde::{Deserialize, Serialize};

use super::device::Rng;
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::persist::VirtioDeviceState;

/// Everything needed to recreate a [`Rng`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Feature negotiation and queues.
    pub virtio: VirtioDeviceState,
}

impl Rng {
    /// The device's snapshot state.
    pub fn state(&self) -> RngState {
        RngState {
            virtio: VirtioDeviceState {
                device_type: self.device_type(),
                avail_features: self.avail_features(),
                acked_features: self.acked_features,
                activated: self.lifecycle.is_active(),
                queues: self.lifecycle.queue_snapshots(),
            },
        }
    }
}
