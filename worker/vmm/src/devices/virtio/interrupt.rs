//! The interrupt line of one virtio-mmio device: the `InterruptStatus` register bits and the
//! eventfd that KVM turns into a guest interrupt (registered by the VM core as an irqfd).
//!
//! Devices raise "used ring updated" from the event-loop thread and the transport clears bits
//! from vCPU threads when the driver writes `InterruptACK`, so the status is an atomic.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

/// Why the device interrupts the driver (bits of the `InterruptStatus` register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device has put buffers in a used ring.
    UsedRing,
    /// The device configuration (or `DEVICE_NEEDS_RESET`) changed.
    Config,
}

impl InterruptKind {
    fn status_bit(self) -> u32 {
        match self {
            InterruptKind::UsedRing => VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// Interrupt status plus the irq eventfd of one device.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl VirtioInterrupt {
    /// `irq_evt` is registered by the VM core with `vm_fd.register_irqfd(&irq_evt, gsi)`.
    pub fn new(irq_evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq_evt,
        }
    }

    /// Sets the status bit for `kind` and signals the guest.
    pub fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// The current `InterruptStatus` register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged (`InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the register to a saved value (snapshot restore; raises no interrupt: a pending one
    /// is in the restored irqchip state).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd that injects the interrupt.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn trigger_sets_bits_and_signals_ack_clears_them() {
        let irq = VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        assert!(irq.irq_evt().read().is_err(), "no signal before trigger");
        irq.trigger(InterruptKind::UsedRing).unwrap();
        irq.trigger(InterruptKind::Config).unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.irq_evt().read().unwrap(), 2);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
