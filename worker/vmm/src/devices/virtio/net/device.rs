//! The network device model: moving Ethernet frames between the virtqueues and the tap.

use std::fs::File;
use std::io::{self, Read, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestMemoryMmap;

use super::tap::{self, TapError};
use crate::devices::virtio::device::{ActivateError, Activation, VirtioDevice, read_config_bytes};
use crate::devices::virtio::lifecycle::DeviceLifecycle;
use crate::devices::virtio::queue_drain::{drain_queue, notify_used};
use crate::devices::virtio::ratelimit::{guest_debug, guest_warn};
use crate::devices::virtio::{FEATURE_EVENT_IDX, FEATURE_VERSION_1};

/// Queue indices.
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
/// Queue sizes offered to the driver (rx, tx).
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// `struct virtio_net_hdr_v1` (with `num_buffers`): what precedes every frame in a buffer
/// once `VIRTIO_F_VERSION_1` is negotiated.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header (always 1: no mergeable rx buffers).
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame taken from the tap or the guest: an Ethernet frame of the tap's 1500-byte
/// MTU with a VLAN tag is 1518; without TSO/GSO nothing larger is legitimate, and anything
/// up to 64 KiB is handled rather than truncated.
pub const MAX_FRAME: usize = 65535;

/// Where the device's host end comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Attach to this tap in the VMM's network namespace.
    Name(String),
    /// Use this already attached tap fd (inherited from the parent).
    Fd(i32),
}

impl From<&crate::config::NetTap> for TapSource {
    fn from(tap: &crate::config::NetTap) -> Self {
        match tap {
            crate::config::NetTap::Name(name) => TapSource::Name(name.clone()),
            crate::config::NetTap::Fd(fd) => TapSource::Fd(*fd),
        }
    }
}

/// How to set up a network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSource,
    /// The guest's MAC address (config space, `VIRTIO_NET_F_MAC`).
    pub mac: [u8; 6],
}

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the activate eventfd")]
    EventFd(#[source] io::Error),
}

/// Frame counters (for tests and debugging; not part of the guest ABI).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames dropped: too large for the guest's buffer, malformed chains, tap errors.
    pub dropped: u64,
}

/// virtio-net backed by a tap, without offloads or mergeable rx buffers.
#[derive(Debug)]
pub struct Net {
    pub(super) config: NetConfig,
    pub(super) tap: File,
    pub(super) acked_features: u64,
    pub(super) lifecycle: DeviceLifecycle,
    /// One frame read from the tap waiting for a guest buffer (`rx_len` bytes after the
    /// header space); bounded to this one frame, the tap's own queue holds the rest.
    rx_buf: Vec<u8>,
    rx_len: usize,
    tx_buf: Vec<u8>,
    pub(super) counters: NetCounters,
}

impl Net {
    /// Opens (or takes over) the tap.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = match &config.tap {
            TapSource::Name(name) => tap::open_by_name(name)?,
            TapSource::Fd(fd) => tap::from_fd(*fd)?,
        };
        Self::with_tap(config, tap)
    }

    /// A device over an already opened, non-blocking tap (or any packet fd, in tests).
    pub(super) fn with_tap(config: NetConfig, tap: File) -> Result<Self, NetError> {
        Ok(Self {
            config,
            tap,
            acked_features: 0,
            lifecycle: DeviceLifecycle::new().map_err(NetError::EventFd)?,
            rx_buf: vec![0u8; HDR_LEN + MAX_FRAME],
            rx_len: 0,
            tx_buf: vec![0u8; HDR_LEN + MAX_FRAME],
            counters: NetCounters::default(),
        })
    }

    /// Frame counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Sends every frame on the tx queue to the tap.
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
        let (tap, buf, counters) = (&mut self.tap, &mut self.tx_buf, &mut self.counters);
        drain_queue(&mut queues[TXQ], mem, interrupt, |chain| {
            match send_frame(mem, chain, buf, tap) {
                Ok(()) => counters.tx_frames += 1,
                Err(err) => {
                    counters.dropped += 1;
                    guest_debug!(%err, "virtio-net: tx frame dropped");
                }
            }
            0
        });
    }

    /// Moves frames from the tap into the guest's rx buffers until either runs out. When the
    /// guest's buffers run out first, the frame waits in `rx_buf` and notifications are
    /// re-enabled so the guest's next buffer kicks the device (the tap is edge-triggered: it is
    /// read again on that kick, not by the event loop spinning on a readable fd).
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
        loop {
            if self.rx_len == 0 {
                match self.tap.read(&mut self.rx_buf[HDR_LEN..]) {
                    Ok(0) => break,
                    Ok(n) => self.rx_len = n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        tracing::warn!(%err, "virtio-net: cannot read the tap");
                        break;
                    }
                }
            }
            let Some(chain) = rxq.pop_descriptor_chain(&*mem) else {
                match rxq.enable_notification(&*mem) {
                    Ok(true) if !rechecked => {
                        rechecked = true;
                        continue;
                    }
                    Ok(_) => {}
                    Err(err) => guest_warn!(%err, "virtio-net: cannot enable rx notifications"),
                }
                break;
            };
            let head = chain.head_index();
            let frame = &mut self.rx_buf[..HDR_LEN + self.rx_len];
            let used = match receive_frame(mem, chain, frame) {
                Ok(len) => {
                    self.counters.rx_frames += 1;
                    len
                }
                Err(err) => {
                    self.counters.dropped += 1;
                    guest_debug!(%err, "virtio-net: rx frame dropped");
                    0
                }
            };
            self.rx_len = 0;
            if let Err(err) = rxq.add_used(&*mem, head, used) {
                guest_warn!(%err, "virtio-net: cannot return an rx buffer");
                break;
            }
            completed = true;
        }
        notify_used(rxq, mem, interrupt, completed);
    }
}

/// Copies one tx chain (header + frame) out of guest memory and writes the frame to the tap.
fn send_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
    tap: &mut File,
) -> io::Result<()> {
    let mut reader = chain.reader(mem).map_err(io::Error::other)?;
    let total = reader.available_bytes();
    if total <= HDR_LEN || total > buf.len() {
        return Err(io::Error::other(format!("tx chain of {total} bytes")));
    }
    reader.read_exact(&mut buf[..total])?;
    // The header carries no offload requests we offered, so it is skipped unread.
    match tap.write(&buf[HDR_LEN..total]) {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::Interrupted => {
            tap.write(&buf[HDR_LEN..total]).map(drop)
        }
        Err(err) => Err(err),
    }
}

/// Writes header + frame (`frame[..HDR_LEN]` is overwritten with the header) into one rx
/// chain; returns the bytes written. A frame larger than the chain is dropped whole.
fn receive_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut [u8],
) -> io::Result<u32> {
    let mut writer = chain.writer(mem).map_err(io::Error::other)?;
    if writer.available_bytes() < frame.len() {
        return Err(io::Error::other(format!(
            "a {}-byte frame does not fit a {}-byte rx buffer",
            frame.len(),
            writer.available_bytes()
        )));
    }
    frame[..HDR_LEN].fill(0);
    frame[NUM_BUFFERS_OFFSET] = 1;
    writer.write_all(frame)?;
    u32::try_from(frame.len()).map_err(io::Error::other)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | FEATURE_EVENT_IDX | (1 << VIRTIO_NET_F_MAC)
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; ... }: only `mac` (VIRTIO_NET_F_MAC).
        read_config_bytes(&self.config.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        guest_warn!("virtio-net: write to the read-only configuration space");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.lifecycle.activate(activation, QUEUE_SIZES.len())
    }

    fn is_activated(&self) -> bool {
        self.lifecycle.is_active()
    }

    fn reset(&mut self) {
        self.lifecycle.reset();
        self.rx_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::test_utils::{
        GuestQueue, activation, event_loop, guest_memory, ro, run_until, wo,
    };

    const MAC: [u8; 6] = [0x06, 0, 0xa9, 0xfe, 0, 2];

    /// A datagram socket pair standing in for the tap: one frame per datagram, as a tap reads.
    fn fake_tap() -> (Net, File) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into `fds`, which has room for them.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (dev, host) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let config = NetConfig {
            tap: TapSource::Fd(fds[0]),
            mac: MAC,
        };
        (Net::with_tap(config, dev).unwrap(), host)
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        vec![fill; len]
    }

    #[test]
    fn config_space_holds_the_mac_and_features_offer_it() {
        let (net, _host) = fake_tap();
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
        assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MAC), 0);
        assert_eq!(net.device_type(), VIRTIO_ID_NET);
        assert_eq!(net.queue_max_sizes().len(), 2);
    }

    #[test]
    fn tx_frames_reach_the_tap_without_their_header() {
        let mem = guest_memory();
        let rx = GuestQueue::new(&mem, 0, 16);
        let mut tx = GuestQueue::new(&mem, 0x8000, 16);
        let (mut net, mut host) = fake_tap();
        // Header in one descriptor, the frame split over two.
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&frame(60, 0xaa), GuestAddress(0x11_0000))
            .unwrap();
        mem.write_slice(&frame(40, 0xbb), GuestAddress(0x12_0000))
            .unwrap();
        tx.add_chain(&[ro(0x10_0000, 12), ro(0x11_0000, 60), ro(0x12_0000, 40)]);
        // A chain with nothing but a header is malformed and dropped.
        tx.add_chain(&[ro(0x13_0000, 12)]);
        let (act, irq) = activation(&mem, vec![rx.queue(), tx.queue()]);
        net.activate(act).unwrap();
        net.process_tx();
        assert_eq!(tx.used_count(), 2);
        let mut got = [0u8; 200];
        let n = host.read(&mut got).unwrap();
        assert_eq!(n, 100);
        assert!(got[..60].iter().all(|&b| b == 0xaa) && got[60..100].iter().all(|&b| b == 0xbb));
        assert!(host.read(&mut got).is_err(), "only one frame sent");
        assert_eq!(
            net.counters(),
            NetCounters {
                rx_frames: 0,
                tx_frames: 1,
                dropped: 1
            }
        );
        assert_ne!(irq.status() & 1, 0);
    }

    #[test]
    fn rx_frames_get_a_header_and_wait_for_buffers() {
        let mem = guest_memory();
        let mut rx = GuestQueue::new(&mem, 0, 16);
        let tx = GuestQueue::new(&mem, 0x8000, 16);
        let (mut net, mut host) = fake_tap();
        host.write_all(&frame(98, 0x11)).unwrap();
        host.write_all(&frame(1514, 0x22)).unwrap();
        rx.add_chain(&[wo(0x10_0000, 1526)]);
        let (act, irq) = activation(&mem, vec![rx.queue(), tx.queue()]);
        net.activate(act).unwrap();
        net.process_rx();
        assert_eq!(rx.used_count(), 1, "one buffer, one frame");
        assert_eq!(rx.used(0).1, 110);
        let mut hdr = [0u8; HDR_LEN];
        mem.read_slice(&mut hdr, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers = 1");
        assert_ne!(irq.status() & 1, 0);

        // The second frame waits in the device until the guest posts a buffer.
        rx.add_chain(&[wo(0x20_0000, 12), wo(0x21_0000, 1514)]);
        net.process_rx();
        assert_eq!(rx.used_count(), 2);
        assert_eq!(rx.used(1).1, 1526);
        let mut body = vec![0u8; 1514];
        mem.read_slice(&mut body, GuestAddress(0x21_0000)).unwrap();
        assert!(body.iter().all(|&b| b == 0x22));
        assert_eq!(net.counters().rx_frames, 2);
    }

    #[test]
    fn a_frame_larger_than_the_buffer_is_dropped_not_truncated() {
        let mem = guest_memory();
        let mut rx = GuestQueue::new(&mem, 0, 16);
        let tx = GuestQueue::new(&mem, 0x8000, 16);
        let (mut net, mut host) = fake_tap();
        host.write_all(&frame(2000, 0x33)).unwrap();
        rx.add_chain(&[wo(0x10_0000, 1526)]);
        let (act, _irq) = activation(&mem, vec![rx.queue(), tx.queue()]);
        net.activate(act).unwrap();
        net.process_rx();
        assert_eq!(rx.used_count(), 1);
        assert_eq!(rx.used(0).1, 0, "buffer returned empty");
        assert_eq!(net.counters().dropped, 1);
    }

    #[test]
    fn the_event_loop_moves_frames_both_ways() {
        let mem = guest_memory();
        let mut rx = GuestQueue::new(&mem, 0, 16);
        let mut tx = GuestQueue::new(&mem, 0x8000, 16);
        let (net, mut host) = fake_tap();
        let net = Arc::new(Mutex::new(net));
        let mut manager = event_loop(net.clone());
        rx.add_chain(&[wo(0x10_0000, 1526)]);
        let (act, _irq) = activation(&mem, vec![rx.queue(), tx.queue()]);
        let tx_kick = act.queue_evts[TXQ].try_clone().unwrap();
        net.lock().unwrap().activate(act).unwrap();
        run_until(&mut manager, "activation", || true);

        host.write_all(&frame(64, 0x44)).unwrap();
        run_until(&mut manager, "frame delivered to the guest", || {
            rx.used_count() == 1
        });

        mem.write_slice(&frame(HDR_LEN + 64, 0), GuestAddress(0x30_0000))
            .unwrap();
        tx.add_chain(&[ro(0x30_0000, u32::try_from(HDR_LEN + 64).unwrap())]);
        tx_kick.write(1).unwrap();
        run_until(&mut manager, "frame sent", || tx.used_count() == 1);
        let mut got = [0u8; 128];
        assert_eq!(host.read(&mut got).unwrap(), 64);
    }
}
