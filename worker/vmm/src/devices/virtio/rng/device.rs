//! The entropy device model.

use std::io::Write;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::device::{ActivateError, Activation, VirtioDevice};
use crate::devices::virtio::lifecycle::DeviceLifecycle;
use crate::devices::virtio::queue_drain::drain_queue;
use crate::devices::virtio::ratelimit::guest_warn;
use crate::devices::virtio::{FEATURE_EVENT_IDX, FEATURE_VERSION_1};

/// Queue size offered to the driver.
const QUEUE_SIZE: u16 = 256;
/// At most this many bytes are produced per request, however large the guest's buffer.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why the entropy device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The activate eventfd could not be created.
    #[error("cannot create the activate eventfd")]
    EventFd(#[source] std::io::Error),
}

/// virtio-rng backed by the host's `getrandom(2)`.
#[derive(Debug)]
pub struct Rng {
    pub(super) acked_features: u64,
    pub(super) lifecycle: DeviceLifecycle,
    /// Entropy staging buffer (allocated once, so serving requests does not allocate).
    scratch: Vec<u8>,
}

impl Rng {
    /// A new, not yet activated entropy device.
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            acked_features: 0,
            lifecycle: DeviceLifecycle::new().map_err(RngError::EventFd)?,
            scratch: vec![0u8; MAX_REQUEST_BYTES],
        })
    }

    /// Serves every available request; signals the guest if any were completed.
    pub(super) fn process_queue(&mut self) {
        let Some(Activation {
            mem,
            queues,
            interrupt,
            ..
        }) = self.lifecycle.active_mut()
        else {
            return;
        };
        let scratch = &mut self.scratch;
        drain_queue(&mut queues[0], mem, interrupt, |chain| {
            fill_with_entropy(mem, scratch, chain)
        });
    }
}

/// Fills the chain's writable buffers (up to [`MAX_REQUEST_BYTES`]); returns bytes written.
fn fill_with_entropy(
    mem: &GuestMemoryMmap,
    scratch: &mut [u8],
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let mut writer = match chain.writer(mem) {
        Ok(writer) => writer,
        Err(err) => {
            guest_warn!(%err, "virtio-rng: invalid descriptor chain");
            return 0;
        }
    };
    let len = writer.available_bytes().min(scratch.len());
    let entropy = &mut scratch[..len];
    if let Err(err) = getrandom::fill(entropy) {
        tracing::error!(%err, "virtio-rng: host getrandom failed");
        return 0;
    }
    if let Err(err) = writer.write_all(entropy) {
        guest_warn!(%err, "virtio-rng: cannot write to guest memory");
        return 0;
    }
    // `len` ≤ MAX_REQUEST_BYTES, which fits a u32.
    u32::try_from(len).unwrap_or(0)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
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

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        guest_warn!("virtio-rng: write to the (absent) configuration space");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.lifecycle.activate(activation, 1)
    }

    fn is_activated(&self) -> bool {
        self.lifecycle.is_active()
    }

    fn reset(&mut self) {
        self.lifecycle.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::test_utils::{
        GuestQueue, activation, event_loop, guest_memory, ro, run_until, wo,
    };

    #[test]
    fn fills_guest_buffers_with_random_bytes() {
        let mem = guest_memory();
        let mut guest = GuestQueue::new(&mem, 0, 16);
        // A 2-buffer chain (4 KiB + 100 B) and a single 32-byte buffer.
        let first = guest.add_chain(&[wo(0x10_0000, 4096), wo(0x20_0000, 100)]);
        let second = guest.add_chain(&[wo(0x30_0000, 32)]);
        let mut rng = Rng::new().unwrap();
        let (act, irq) = activation(&mem, vec![guest.queue()]);
        rng.activate(act).unwrap();
        rng.process_queue();

        assert_eq!(guest.used_count(), 2);
        assert_eq!(guest.used(0), (u32::from(first), 4196));
        assert_eq!(guest.used(1), (u32::from(second), 32));
        let mut buf = vec![0u8; 4096];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        // 4 KiB of zeros from a working getrandom has probability 2^-32768.
        assert!(buf.iter().any(|&b| b != 0), "buffer still zero");
        let mut other = vec![0u8; 4096];
        mem.read_slice(&mut other[..100], GuestAddress(0x20_0000))
            .unwrap();
        assert_ne!(buf[..100], other[..100], "two buffers got the same bytes");
        assert_ne!(irq.status() & 1, 0, "used-ring interrupt raised");
    }

    #[test]
    fn read_only_buffers_get_nothing() {
        let mem = guest_memory();
        let mut guest = GuestQueue::new(&mem, 0, 16);
        guest.add_chain(&[ro(0x10_0000, 64)]);
        let mut rng = Rng::new().unwrap();
        let (act, _irq) = activation(&mem, vec![guest.queue()]);
        rng.activate(act).unwrap();
        rng.process_queue();
        assert_eq!(guest.used_count(), 1);
        assert_eq!(guest.used(0).1, 0);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(buf, [0u8; 64]);
    }

    #[test]
    fn oversized_requests_are_capped() {
        let mem = guest_memory();
        let mut guest = GuestQueue::new(&mem, 0, 16);
        guest.add_chain(&[wo(0x10_0000, 1 << 20)]);
        let mut rng = Rng::new().unwrap();
        let (act, _irq) = activation(&mem, vec![guest.queue()]);
        rng.activate(act).unwrap();
        rng.process_queue();
        assert_eq!(guest.used(0).1, u32::try_from(MAX_REQUEST_BYTES).unwrap());
    }

    #[test]
    fn event_loop_serves_kicks_after_activation_and_stops_after_reset() {
        let mem = guest_memory();
        let mut guest = GuestQueue::new(&mem, 0, 16);
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut manager = event_loop(rng.clone());
        let (act, _irq) = activation(&mem, vec![guest.queue()]);
        let kick = act.queue_evts[0].try_clone().unwrap();
        rng.lock().unwrap().activate(act).unwrap();
        run_until(&mut manager, "activation", || true);
        manager.run_with_timeout(10).unwrap();

        guest.add_chain(&[wo(0x10_0000, 16)]);
        kick.write(1).unwrap();
        run_until(&mut manager, "first request served", || {
            guest.used_count() == 1
        });

        rng.lock().unwrap().reset();
        manager.run_with_timeout(10).unwrap();
        guest.add_chain(&[wo(0x10_0000, 16)]);
        kick.write(1).unwrap();
        manager.run_with_timeout(50).unwrap();
        assert_eq!(guest.used_count(), 1, "a reset device serves nothing");
    }
}
