//! Test helpers: a driver-side view of split queues in real guest memory (on virtio-queue's
//! `MockSplitQueue`), and a real event loop to run device subscribers.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
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

/// The driver's side of one split queue.
pub struct GuestQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
}

impl<'a> GuestQueue<'a> {
    /// A queue of `size` entries whose rings start at `start`.
    pub fn new(mem: &'a GuestMemoryMmap, start: u64, size: u16) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(start), size),
            size,
            next_desc: 0,
        }
    }

    /// The device-side queue (ready, addresses set).
    pub fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// Makes a chain of `bufs` available; returns its head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let n = u16::try_from(bufs.len()).unwrap();
        self.add_chain_with(n, |_| bufs.to_vec())
    }

    /// Makes a chain of `n` buffers available, choosing them from the head index (so buffer
    /// addresses can be derived from it); returns the head index. At most `size` chains can be
    /// added over the queue's life (the mock's available ring does not wrap).
    pub fn add_chain_with(&mut self, n: u16, make: impl FnOnce(u16) -> Vec<Buf>) -> u16 {
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        let bufs = make(first);
        assert_eq!(bufs.len(), usize::from(n));
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, buf)| {
                let i = u16::try_from(i).unwrap();
                let last = i + 1 == n;
                let mut flags = if buf.writable { VRING_DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT;
                }
                let next = if last { 0 } else { first + i + 1 };
                RawDescriptor::from(SplitDescriptor::new(
                    buf.addr,
                    buf.len,
                    u16::try_from(flags).unwrap(),
                    next,
                ))
            })
            .collect();
        self.mock.add_desc_chains(&descs, first).unwrap();
        self.next_desc += n;
        first
    }

    /// How many chains the device has returned.
    pub fn used_count(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// The `i`th used element: (head index, bytes written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let elem = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(i % self.size))
            .unwrap()
            .load();
        (elem.id(), elem.len())
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
