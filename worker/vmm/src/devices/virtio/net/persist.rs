//! Snapshot state of the network device: features, queue positions and the MAC.
//!
//! The tap is host state: a restored VM is given its tap anew (by name inside the sandbox's
//! namespace, or as an fd), and since every sandbox's namespace has the same tap name and guest
//! MAC, a clone attaches to its own namespace's tap with no guest reconfiguration. A frame the
//! device held for the guest when the snapshot was taken is not saved (a lost frame, which
//! TCP retransmits).

use serde::{Deserialize, Serialize};

use super::device::{Net, NetConfig, NetError, TapSource};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::persist::VirtioDeviceState;
use crate::snapshot::Persist;

/// Everything needed to recreate a [`Net`] (given a tap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Feature negotiation and queues (rx, tx).
    pub virtio: VirtioDeviceState,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// The tap's name when it was attached by name (informational; restore is told anew).
    pub tap_name: Option<String>,
}

impl Net {
    /// The device's snapshot state.
    pub fn state(&self) -> NetState {
        NetState {
            virtio: VirtioDeviceState {
                device_type: self.device_type(),
                avail_features: self.avail_features(),
                acked_features: self.acked_features,
                activated: self.lifecycle.is_active(),
                queues: self.lifecycle.queue_snapshots(),
            },
            mac: self.config.mac,
            tap_name: match &self.config.tap {
                TapSource::Name(name) => Some(name.clone()),
                TapSource::Fd(_) => None,
            },
        }
    }
}

/// What the restoring process provides: the tap to attach to. `None` attaches to the tap of
/// the saved name in the restoring VMM's network namespace (every sandbox namespace has the
/// same tap name, so a clone finds its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetRestoreArgs {
    pub tap: Option<TapSource>,
}

/// Why a network device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum NetRestoreError {
    #[error("the snapshot's network device used an inherited tap fd: give a tap to attach to")]
    NoTap,
    #[error(transparent)]
    Net(#[from] NetError),
}

impl Persist for Net {
    type State = NetState;
    type RestoreArgs = NetRestoreArgs;
    type Error = NetRestoreError;

    fn save(&self) -> NetState {
        self.state()
    }

    /// A new device on the given (or same-named) tap with the saved MAC and features, not
    /// activated (the transport re-activates it).
    fn restore(args: NetRestoreArgs, state: &NetState) -> Result<Self, NetRestoreError> {
        let tap = match (args.tap, &state.tap_name) {
            (Some(tap), _) => tap,
            (None, Some(name)) => TapSource::Name(name.clone()),
            (None, None) => return Err(NetRestoreError::NoTap),
        };
        let mut net = Net::new(NetConfig {
            tap,
            mac: state.mac,
        })?;
        net.acked_features = state.virtio.acked_features & net.avail_features();
        Ok(net)
    }
}
