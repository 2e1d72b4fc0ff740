//! Snapshot state of the vsock device.
//!
//! Saved: features, queue positions, guest CID and socket path. Live connections are **not**
//! saved: their host ends are file descriptors of this process (Unix streams to clients and
//! listeners that will not exist in the restoring process), and the credit counters only make
//! sense together with those streams. On restore the device must therefore post
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue so the guest drops every socket
//! (as Firecracker does), and host clients reconnect. `connections` records how many were cut.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::Vsock;
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::persist::VirtioDeviceState;

/// Everything needed to recreate a [`Vsock`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Feature negotiation and queues (rx, tx, event).
    pub virtio: VirtioDeviceState,
    /// The guest's context id.
    pub guest_cid: u64,
    /// The per-VM host socket.
    pub uds_path: PathBuf,
    /// Connections open when the state was taken (they do not survive a restore).
    pub connections: usize,
}

impl Vsock {
    /// The device's snapshot state.
    pub fn state(&self) -> VsockState {
        VsockState {
            virtio: VirtioDeviceState {
                device_type: self.device_type(),
                avail_features: self.avail_features(),
                acked_features: self.acked_features,
                activated: self.lifecycle.is_active(),
                queues: self.lifecycle.queue_snapshots(),
            },
            guest_cid: self.config.guest_cid,
            uds_path: self.config.uds_path.clone(),
            connections: self.muxer.connection_count(),
        }
    }
}
