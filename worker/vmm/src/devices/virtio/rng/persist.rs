//! Snapshot state of the entropy device: features and queue positions (it has no other state).

use serde::{Deserialize, Serialize};

use super::device::{Rng, RngError};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::persist::VirtioDeviceState;
use crate::snapshot::Persist;

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

impl Persist for Rng {
    type State = RngState;
    type RestoreArgs = ();
    type Error = RngError;

    fn save(&self) -> RngState {
        self.state()
    }

    /// A new device with the saved features, not activated (the transport re-activates it).
    fn restore((): (), state: &RngState) -> Result<Self, RngError> {
        let mut rng = Rng::new()?;
        rng.acked_features = state.virtio.acked_features & rng.avail_features();
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_acked_features_not_activated() {
        let mut rng = Rng::new().unwrap();
        rng.set_acked_features(rng.avail_features());
        let state = rng.save();
        let back = Rng::restore((), &state).unwrap();
        assert_eq!(back.acked_features(), rng.avail_features());
        assert!(!back.is_activated());
    }
}
