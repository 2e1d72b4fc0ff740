//! The device side of "disable notifications, drain, re-enable, re-check": while a device is
//! working through a queue the driver need not kick it, and with `VIRTIO_RING_F_EVENT_IDX` the
//! re-enable step tells the driver exactly from which entry on a kick is wanted. Fewer kicks and
//! interrupts mean fewer VM exits, which are the expensive part of virtio under nested KVM.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::interrupt::{InterruptKind, VirtioInterrupt};
use super::ratelimit::guest_warn;

/// Serves every available chain with `serve` (which returns the used length), then raises the
/// used-ring interrupt if anything was used and the driver wants one. Returns whether any chain
/// was used.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> bool {
    let mut used = false;
    loop {
        if let Err(err) = queue.disable_notification(mem) {
            guest_warn!(%err, "virtio: cannot disable queue notifications");
        }
        let mut progressed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = serve(chain);
            if let Err(err) = queue.add_used(mem, head, len) {
                guest_warn!(%err, "virtio: cannot return a buffer to the used ring");
                notify_used(queue, mem, interrupt, used);
                return used;
            }
            used = true;
            progressed = true;
        }
        match queue.enable_notification(mem) {
            // New entries arrived while notifications were off: serve them too. Without
            // progress (an available index the queue rejects) stop instead of spinning.
            Ok(true) if progressed => continue,
            Ok(_) => break,
            Err(err) => {
                guest_warn!(%err, "virtio: cannot enable queue notifications");
                break;
            }
        }
    }
    notify_used(queue, mem, interrupt, used);
    used
}

/// Raises the used-ring interrupt after `used` buffers went back, unless the driver (through
/// `used_event`) said it does not need one yet.
pub fn notify_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    used: bool,
) {
    if used
        && queue.needs_notification(mem).unwrap_or(true)
        && let Err(err) = interrupt.trigger(InterruptKind::UsedRing)
    {
        tracing::error!(%err, "virtio: cannot raise the used-ring interrupt");
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::devices::virtio::test_utils::{GuestQueue, guest_memory, wo};

    fn interrupt() -> VirtioInterrupt {
        VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn drains_everything_and_rearms_notifications() {
        let mem = guest_memory();
        let mut guest = GuestQueue::new(&mem, 0, 16);
        for i in 0..3 {
            guest.add_chain(&[wo(0x10_0000 + i * 0x100, 8)]);
        }
        for event_idx in [false, true] {
            let mut queue = guest.queue();
            queue.set_event_idx(event_idx);
            let irq = interrupt();
            let mut served = 0;
            assert!(drain_queue(&mut queue, &mem, &irq, |_| {
                served += 1;
                4
            }));
            assert_eq!(served, 3);
            assert_eq!(
                irq.status(),
                1,
                "used-ring interrupt (event_idx {event_idx})"
            );
            if event_idx {
                assert_eq!(guest.avail_event(), 3, "kick wanted from entry 3 on");
            }
        }
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
        let mem = guest_memory();
        let mut guest = GuestQueue::new(&mem, 0, 16);
        guest.add_chain(&[wo(0x10_0000, 8)]);
        guest.set_used_event(5);
        let mut queue = guest.queue();
        queue.set_event_idx(true);
        let irq = interrupt();
        assert!(drain_queue(&mut queue, &mem, &irq, |_| 0));
        assert_eq!(
            irq.status(),
            0,
            "driver asked for an interrupt only after entry 5"
        );
        guest.add_chain(&[wo(0x10_0000, 8)]);
        guest.set_used_event(1);
        assert!(drain_queue(&mut queue, &mem, &irq, |_| 0));
        assert_eq!(irq.status(), 1);
    }

    #[test]
    fn a_bogus_available_index_does_not_spin() {
        let mem = guest_memory();
        let guest = GuestQueue::new(&mem, 0, 16);
        guest.set_avail_idx(1000);
        let mut queue = guest.queue();
        let irq = interrupt();
        assert!(!drain_queue(&mut queue, &mem, &irq, |_| 0));
        assert_eq!(guest.used_count(), 0);
    }
}
