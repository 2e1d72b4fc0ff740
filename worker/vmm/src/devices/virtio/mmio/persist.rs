//! Restoring a virtio-mmio transport, and through it its device's running queues.
//!
//! The device itself is restored first by its own [`Persist`] impl and comes back **not
//! activated** with its acked features; this transport then loads its registers and the
//! driver's queue configuration, rebuilds the device's running queues from the saved
//! [`VirtioDeviceState`] and activates the device with them (the queue eventfds and interrupt
//! are this process's). Finally every queue eventfd is signalled once: a kick the device
//! thread had not served when the snapshot was taken is not lost, and a spurious one is
//! harmless.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{MmioError, MmioTransport, MmioTransportState, lock};
use crate::devices::virtio::device::{ActivateError, Activation, VirtioDevice};
use crate::devices::virtio::interrupt::VirtioInterrupt;
use crate::devices::virtio::persist::{QueueSnapshot, VirtioDeviceState};
use crate::snapshot::Persist;

/// Why a transport could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    #[error("could not create the transport")]
    Create(#[from] MmioError),
    #[error("the saved device has type {saved}, the restored one {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("the saved transport has {saved} queues, the device {actual}")]
    QueueCount { saved: usize, actual: usize },
    #[error("saved queue {index} is invalid")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("a saved running queue lies outside guest memory")]
    QueueMemory,
    #[error("could not duplicate a queue eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("could not activate the restored device")]
    Activate(#[from] ActivateError),
}

/// What a restored transport is built from.
pub struct MmioRestoreArgs {
    /// Guest memory of the restored VM.
    pub mem: GuestMemoryMmap,
    /// The device, restored and not activated.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Its interrupt line (irqfd already registered).
    pub interrupt: Arc<VirtioInterrupt>,
    /// The device's saved feature and queue state.
    pub device_state: VirtioDeviceState,
}

impl std::fmt::Debug for MmioRestoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioRestoreArgs")
            .field("device_state", &self.device_state)
            .finish_non_exhaustive()
    }
}

fn queue_from(index: usize, q: &QueueSnapshot) -> Result<Queue, MmioRestoreError> {
    Queue::try_from(QueueState {
        max_size: q.max_size,
        next_avail: q.next_avail,
        next_used: q.next_used,
        event_idx_enabled: q.event_idx_enabled,
        size: q.size,
        ready: q.ready,
        desc_table: q.desc_table,
        avail_ring: q.avail_ring,
        used_ring: q.used_ring,
    })
    .map_err(|source| MmioRestoreError::Queue { index, source })
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type RestoreArgs = MmioRestoreArgs;
    type Error = MmioRestoreError;

    fn save(&self) -> MmioTransportState {
        self.state()
    }

    fn restore(args: MmioRestoreArgs, state: &MmioTransportState) -> Result<Self, Self::Error> {
        let MmioRestoreArgs {
            mem,
            device,
            interrupt,
            device_state,
        } = args;
        let mut transport = MmioTransport::new(mem, device, interrupt)?;
        let actual = lock(&transport.device).device_type();
        if actual != device_state.device_type {
            return Err(MmioRestoreError::DeviceType {
                saved: device_state.device_type,
                actual,
            });
        }
        if state.queues.len() != transport.queues.len() {
            return Err(MmioRestoreError::QueueCount {
                saved: state.queues.len(),
                actual: transport.queues.len(),
            });
        }
        transport.queues = (0..)
            .zip(&state.queues)
            .map(|(i, q)| queue_from(i, q))
            .collect::<Result<_, _>>()?;
        transport.device_status = state.device_status;
        transport.features_select = state.features_select;
        transport.acked_features_select = state.acked_features_select;
        transport.queue_select = state.queue_select;
        transport.config_generation = state.config_generation;
        transport.interrupt.restore_status(state.interrupt_status);

        if device_state.activated {
            if device_state.queues.len() != transport.queues.len() {
                return Err(MmioRestoreError::QueueCount {
                    saved: device_state.queues.len(),
                    actual: transport.queues.len(),
                });
            }
            let queues = (0..)
                .zip(&device_state.queues)
                .map(|(i, q)| queue_from(i, q))
                .collect::<Result<Vec<_>, _>>()?;
            if queues.iter().any(|q| !q.is_valid(&transport.mem)) {
                return Err(MmioRestoreError::QueueMemory);
            }
            let queue_evts = transport
                .queue_evts
                .iter()
                .map(|e| e.try_clone())
                .collect::<Result<Vec<_>, _>>()
                .map_err(MmioRestoreError::EventFd)?;
            lock(&transport.device).activate(Activation {
                mem: transport.mem.clone(),
                queues,
                queue_evts,
                interrupt: transport.interrupt.clone(),
            })?;
            for evt in &transport.queue_evts {
                evt.write(1).map_err(MmioRestoreError::EventFd)?;
            }
        }
        Ok(transport)
    }
}
