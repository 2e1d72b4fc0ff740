//! The COM1 16550 UART (vm-superio) on ports 0x3f8–0x3ff; its interrupt is an eventfd that KVM
//! injects as GSI 4 (irqfd), so raising it costs no exit.

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::ConsoleSink;
use crate::devices::bus::BusDevice;

/// vm-superio's interrupt line as an eventfd (a local newtype: `Trigger` is foreign).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial port as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
    errors_logged: u32,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

/// Device errors are guest-triggerable: log only the first few.
const MAX_LOGGED_ERRORS: u32 = 8;

impl SerialDevice {
    /// A UART whose interrupt is `irq` and whose output goes to `sink`.
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq), sink),
            errors_logged: 0,
        }
    }

    /// The UART's register state (for snapshots).
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }

    /// A UART in a saved register state.
    pub fn from_state(
        state: &vm_superio::serial::SerialState,
        irq: EventFd,
        sink: ConsoleSink,
    ) -> Result<Self, vm_superio::serial::Error<std::io::Error>> {
        Ok(Self {
            serial: Serial::from_state(
                state,
                EventFdTrigger(irq),
                vm_superio::serial::NoEvents,
                sink,
            )?,
            errors_logged: 0,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.serial.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [byte]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.serial.write(offset, *byte)
            && self.errors_logged < MAX_LOGGED_ERRORS
        {
            self.errors_logged += 1;
            tracing::warn!(error = ?e, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitCoordinator;
    use std::sync::Arc;

    #[test]
    fn transmitted_bytes_reach_the_sink_and_raise_the_interrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::new(
            Some(std::fs::File::create(&path).unwrap()),
            false,
            Arc::new(ExitCoordinator::new()),
        );
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), sink);
        // Enable the THR-empty interrupt (IER bit 1), then send "hi\n".
        dev.write(1, &[0x02]);
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        drop(dev);
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn odd_sized_reads_float_high() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::new(None, false, Arc::new(ExitCoordinator::new()));
        let mut dev = SerialDevice::new(irq, sink);
        let mut two = [0u8; 2];
        dev.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }
}
