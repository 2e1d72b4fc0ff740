//! Test helpers: a driver-side view of split queues in real guest memory (descriptors through
//! virtio-queue's mock `DescriptorTable`), and a real event loop to run device subscribers.

use std::sync::atomic::{Ordering, fence};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::DescriptorTable;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::device::Activation;
use super::interrupt::VirtioInterrupt;

/// 16 MiB of guest memory: queues in the first MiB, buffers above.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// A buffer of a descriptor chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// Device-readable buffer.
pub fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: false,
    }
}

/// Device-writable buffer.
pub fn wo(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: true,
    }
}

/// The driver's side of one split queue: descriptors written with virtio-queue's mock
/// `DescriptorTable`, the rings laid out as the virtio spec (and Linux) does. (The mock's
/// `MockSplitQueue` is not used: it sizes the available ring by entry count instead of bytes,
/// so its used ring overlaps the available ring's tail and `used_event`.)
pub struct GuestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    desc: DescriptorTable<'a, GuestMemoryMmap>,
    desc_addr: u64,
    avail_addr: u64,
    used_addr: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> GuestQueue<'a> {
    /// A queue of `size` entries whose rings start at `start`.
    pub fn new(mem: &'a GuestMemoryMmap, start: u64, size: u16) -> Self {
        let desc_addr = start;
        let avail_addr = desc_addr + 16 * u64::from(size);
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let used_addr = (avail_addr + 6 + 2 * u64::from(size) + 3) & !3;
        // Zero both rings (flags, indices, event fields).
        let used_end = used_addr + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; usize::try_from(used_end - avail_addr).unwrap()];
        mem.write_slice(&zeros, GuestAddress(avail_addr)).unwrap();
        Self {
            mem,
            desc: DescriptorTable::new(mem, GuestAddress(desc_addr), size),
            desc_addr,
            avail_addr,
            used_addr,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device-side queue (ready, addresses set).
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_addr))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_addr))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(self.used_addr))
            .unwrap();
        queue.set_ready(true);
        queue
    }

    /// Makes a chain of `bufs` available; returns its head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let n = u16::try_from(bufs.len()).unwrap();
        self.add_chain_with(n, |_| bufs.to_vec())
    }

    /// Makes a chain of `n` buffers available, choosing them from the head index (so buffer
    /// addresses can be derived from it); returns the head index. Descriptor indices wrap, so
    /// the device must have used a chain before its descriptors come round again.
    pub fn add_chain_with(&mut self, n: u16, make: impl FnOnce(u16) -> Vec<Buf>) -> u16 {
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        let bufs = make(first);
        assert_eq!(bufs.len(), usize::from(n));
        for (i, buf) in bufs.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            let last = i + 1 == n;
            let mut flags = if buf.writable { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = if last { 0 } else { first + i + 1 };
            let desc = SplitDescriptor::new(buf.addr, buf.len, u16::try_from(flags).unwrap(), next);
            self.desc
                .store(first + i, RawDescriptor::from(desc))
                .unwrap();
        }
        self.next_desc += n;
        let slot = self.avail_addr + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(first, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_addr + 2))
            .unwrap();
        first
    }

    /// `avail_event` (after the used ring): where the device wants the next kick.
    pub fn avail_event(&self) -> u16 {
        let addr = self.used_addr + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Sets `used_event` (after the available ring): after which entry an interrupt is wanted.
    pub fn set_used_event(&self, value: u16) {
        let addr = self.avail_addr + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// Overwrites the available ring's index (as a broken or hostile driver might).
    pub fn set_avail_idx(&self, value: u16) {
        self.mem
            .write_obj(value, GuestAddress(self.avail_addr + 2))
            .unwrap();
    }

    /// How many chains the device has returned.
    pub fn used_count(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap()
    }

    /// The `i`th used element: (head index, bytes written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let elem = self.used_addr + 4 + 8 * u64::from(i % self.size);
        let id = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        (id, len)
    }
}

/// An activation of `queues` with fresh eventfds; also returns the interrupt to inspect.
pub fn activation(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> (Activation, Arc<VirtioInterrupt>) {
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let queue_evts = queues
        .iter()
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    (
        Activation {
            mem: mem.clone(),
            queues,
            queue_evts,
            interrupt: interrupt.clone(),
        },
        interrupt,
    )
}

/// A device event loop like the VM core's.
pub type TestEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// An event loop with `device` subscribed.
pub fn event_loop<T: MutEventSubscriber + Send + 'static>(
    device: Arc<Mutex<T>>,
) -> TestEventManager {
    let mut manager = TestEventManager::new().unwrap();
    manager.add_subscriber(device);
    manager
}

/// Runs the event loop until `done` holds, for at most ~5 s; panics with `what` otherwise.
pub fn run_until(manager: &mut TestEventManager, what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        manager.run_with_timeout(10).unwrap();
    }
    assert!(done(), "timed out waiting for: {what}");
}
