//! The vsock device model: configuration, and moving packets between the virtqueues and the
//! muxer.

use std::path::PathBuf;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::QueueT;
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};

use super::muxer::{Muxer, MuxerError};
use super::packet::{HOST_CID, Header};
use crate::devices::virtio::device::{ActivateError, Activation, VirtioDevice, read_config_bytes};
use crate::devices::virtio::lifecycle::DeviceLifecycle;
use crate::devices::virtio::queue_drain::{drain_queue, notify_used};
use crate::devices::virtio::ratelimit::{guest_debug, guest_warn};
use crate::devices::virtio::{FEATURE_EVENT_IDX, FEATURE_VERSION_1};

/// Queue indices.
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
/// Queue size offered to the driver (rx, tx, event).
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
/// Largest packet payload accepted from or offered to the guest.
const MAX_PKT_DATA: u32 = 64 * 1024;

/// How to set up a vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 ..= u32::MAX - 1).
    pub guest_cid: u64,
    /// The per-VM host Unix socket.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Reserved or out-of-range guest CID.
    #[error("invalid guest CID {0}: must be between 3 and 4294967294")]
    InvalidCid(u64),
    /// The host socket could not be set up.
    #[error("cannot set up the vsock host socket")]
    Muxer(#[from] MuxerError),
    /// The activate eventfd could not be created.
    #[error("cannot create the activate eventfd")]
    EventFd(#[source] std::io::Error),
}

/// virtio-vsock with a Unix-socket host side.
#[derive(Debug)]
pub struct Vsock {
    pub(super) config: VsockConfig,
    pub(super) acked_features: u64,
    pub(super) lifecycle: DeviceLifecycle,
    pub(super) muxer: Muxer,
}

impl Vsock {
    /// Creates the device and starts listening on `config.uds_path`.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid <= HOST_CID || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        let muxer = Muxer::new(config.guest_cid, &config.uds_path)?;
        Ok(Self {
            config,
            acked_features: 0,
            lifecycle: DeviceLifecycle::new().map_err(VsockError::EventFd)?,
            muxer,
        })
    }

    /// The host side (for inspection).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// Hands every packet on the tx queue to the muxer.
    pub(super) fn process_tx(&mut self) {
        let Some(Activation {
            mem,
            queues,
            interrupt,
            ..
        }) = self.lifecycle.active_mut()
        else {
            return;
        };
        let muxer = &mut self.muxer;
        drain_queue(&mut queues[TXQ], mem, interrupt, |mut chain| {
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Header::from_packet(&pkt);
                    guest_debug!(
                        op = hdr.op,
                        src_port = hdr.src_port,
                        dst_port = hdr.dst_port,
                        len = hdr.len,
                        "vsock: packet from the guest"
                    );
                    muxer.on_guest_packet(&hdr, pkt.data_slice());
                }
                Err(err) => guest_warn!(%err, "vsock: malformed tx packet dropped"),
            }
            0
        });
    }

    /// Fills rx buffers with whatever the muxer has for the guest. When the guest's buffers run
    /// out first, notifications are re-enabled so its next buffer kicks the device.
    pub(super) fn process_rx(&mut self) {
        let Some(Activation {
            mem,
            queues,
            interrupt,
            ..
        }) = self.lifecycle.active_mut()
        else {
            return;
        };
        let rxq = &mut queues[RXQ];
        let mut completed = false;
        let mut rechecked = false;
        while self.muxer.has_rx() {
            let Some(mut chain) = rxq.pop_descriptor_chain(&*mem) else {
                // Starved: ask for a kick on the next buffer; re-check once for a buffer that
                // raced with that request.
                match rxq.enable_notification(&*mem) {
                    Ok(true) if !rechecked => {
                        rechecked = true;
                        continue;
                    }
                    Ok(_) => {}
                    Err(err) => guest_warn!(%err, "vsock: cannot enable rx notifications"),
                }
                break;
            };
            let head = chain.head_index();
            let used_len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_rx(pkt.data_slice()) {
                    Some((hdr, len)) => {
                        guest_debug!(
                            op = hdr.op,
                            src_port = hdr.src_port,
                            dst_port = hdr.dst_port,
                            len,
                            "vsock: packet to the guest"
                        );
                        hdr.write_to(&mut pkt);
                        PKT_HEADER_SIZE + len
                    }
                    None => {
                        // Nothing to send after all: give the buffer back.
                        rxq.set_next_avail(rxq.next_avail().wrapping_sub(1));
                        break;
                    }
                },
                Err(err) => {
                    guest_warn!(%err, "vsock: malformed rx buffer returned unused");
                    0
                }
            };
            let used_len = u32::try_from(used_len).unwrap_or(0);
            if let Err(err) = rxq.add_used(&*mem, head, used_len) {
                guest_warn!(%err, "vsock: cannot return an rx buffer");
                break;
            }
            completed = true;
        }
        notify_used(rxq, mem, interrupt, completed);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | FEATURE_EVENT_IDX
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.config.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        guest_warn!("vsock: write to the read-only configuration space");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.lifecycle.activate(activation, QUEUE_SIZES.len())
    }

    fn is_activated(&self) -> bool {
        self.lifecycle.is_active()
    }

    fn reset(&mut self) {
        self.lifecycle.reset();
        self.muxer.reset();
    }
}
