//! Snapshot state of the vsock device.
//!
//! Saved: features, queue positions, guest CID and socket path. Live connections are **not**
//! saved: their host ends are file descriptors of this process (Unix streams to clients and
//! listeners that will not exist in the restoring process), and the credit counters only make
//! sense together with those streams. On restore the device therefore posts
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue ([`Vsock::send_transport_reset`]) so
//! the guest drops every connected socket (as Firecracker does); listening sockets survive, and
//! host clients reconnect. `connections` records how many were cut.

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::device::{Vsock, VsockConfig, VsockError};
use crate::devices::virtio::device::{Activation, VirtioDevice};
use crate::devices::virtio::persist::VirtioDeviceState;
use crate::devices::virtio::queue_drain::notify_used;
use crate::snapshot::Persist;

/// The event queue's index (rx 0, tx 1, event 2).
const EVQ: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Everything needed to recreate a [`Vsock`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Feature negotiation and queues (rx, tx, event).
    pub virtio: VirtioDeviceState,
    /// The guest's context id.
    pub guest_cid: u64,
    /// The per-VM host socket when saved (a restore gets its own path).
    pub uds_path: PathBuf,
    /// Connections open when the state was taken (they do not survive a restore).
    pub connections: usize,
}

/// Why the transport-reset event could not be posted.
#[derive(Debug, thiserror::Error)]
pub enum TransportResetError {
    #[error("the device is not activated")]
    NotActive,
    #[error("the guest left no buffer in the event queue")]
    NoBuffer,
    #[error("the event queue's buffer is unusable")]
    Buffer(#[source] virtio_queue::Error),
    #[error("could not write the event into guest memory")]
    Write(#[source] std::io::Error),
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

    /// Posts `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (`struct virtio_vsock_event { le32 id }`) on
    /// the event queue and interrupts the guest: its driver resets every connected socket.
    pub fn send_transport_reset(&mut self) -> Result<(), TransportResetError> {
        let Some(Activation {
            mem,
            queues,
            interrupt,
            ..
        }) = self.lifecycle.active_mut()
        else {
            return Err(TransportResetError::NotActive);
        };
        let evq = &mut queues[EVQ];
        let chain = evq
            .pop_descriptor_chain(&*mem)
            .ok_or(TransportResetError::NoBuffer)?;
        let head = chain.head_index();
        let mut writer = chain.writer(mem).map_err(TransportResetError::Buffer)?;
        writer
            .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
            .map_err(TransportResetError::Write)?;
        let len = u32::try_from(std::mem::size_of::<u32>()).unwrap_or(4);
        evq.add_used(&*mem, head, len)
            .map_err(TransportResetError::Buffer)?;
        notify_used(evq, mem, interrupt, true);
        Ok(())
    }
}

/// Host-side settings of a restored vsock device (given anew, never taken from the snapshot).
#[derive(Debug, Clone)]
pub struct VsockRestoreArgs {
    /// The restored VM's host socket.
    pub uds_path: PathBuf,
}

impl Persist for Vsock {
    type State = VsockState;
    type RestoreArgs = VsockRestoreArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        self.state()
    }

    /// A new device with the saved CID and features on a new socket, not activated (the
    /// transport re-activates it; then call [`Vsock::send_transport_reset`]).
    fn restore(args: VsockRestoreArgs, state: &VsockState) -> Result<Self, VsockError> {
        let mut vsock = Vsock::new(VsockConfig {
            guest_cid: state.guest_cid,
            uds_path: args.uds_path,
        })?;
        vsock.acked_features = state.virtio.acked_features & vsock.avail_features();
        Ok(vsock)
    }
}
