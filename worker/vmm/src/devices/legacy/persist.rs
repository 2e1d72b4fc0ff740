//! Snapshot state of the legacy devices through [`Persist`]: the UART's registers (a serde
//! mirror of vm-superio's `SerialState`, which has no serde) and the i8042's registers.
//!
//! Host ends are given anew on restore: the serial console's sink (log file, stdout) and its
//! interrupt eventfd, the i8042's reset callback.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use super::i8042::{I8042, I8042State};
use super::{ConsoleSink, SerialDevice};
use crate::snapshot::Persist;

/// The 16550's registers and receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Why the UART could not be restored.
#[derive(Debug, thiserror::Error)]
#[error("the saved serial port state is invalid: {0:?}")]
pub struct SerialRestoreError(pub vm_superio::serial::Error<std::io::Error>);

/// What a restored UART is connected to.
#[derive(Debug)]
pub struct SerialRestoreArgs {
    /// Its interrupt (registered as an irqfd on GSI 4).
    pub irq: EventFd,
    /// Where its output goes.
    pub sink: ConsoleSink,
}

impl Persist for SerialDevice {
    type State = SerialSnapshot;
    type RestoreArgs = SerialRestoreArgs;
    type Error = SerialRestoreError;

    fn save(&self) -> SerialSnapshot {
        SerialSnapshot::from(&self.state())
    }

    fn restore(args: SerialRestoreArgs, state: &SerialSnapshot) -> Result<Self, Self::Error> {
        SerialDevice::from_state(&SerialState::from(state), args.irq, args.sink)
            .map_err(SerialRestoreError)
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type RestoreArgs = Box<dyn FnMut() + Send>;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        self.state()
    }

    fn restore(on_reset: Self::RestoreArgs, state: &I8042State) -> Result<Self, Self::Error> {
        Ok(I8042::from_state(state, on_reset))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::exit::ExitCoordinator;

    fn sink() -> ConsoleSink {
        ConsoleSink::new(None, false, Arc::new(ExitCoordinator::new()))
    }

    #[test]
    fn the_uart_keeps_its_registers_across_save_and_restore() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), sink());
        dev.write(3, &[0x80]); // DLAB on
        dev.write(0, &[0x0c]); // divisor low: 9600 baud
        dev.write(3, &[0x03]); // 8N1, DLAB off
        dev.write(7, &[0x5a]); // scratch
        let saved = dev.save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let mut restored =
            SerialDevice::restore(SerialRestoreArgs { irq, sink: sink() }, &back).unwrap();
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(3, &mut b);
        assert_eq!(b[0], 0x03);
        assert_eq!(restored.save(), saved);
    }

    #[test]
    fn an_overfull_fifo_is_refused() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut state = SerialDevice::new(irq.try_clone().unwrap(), sink()).save();
        state.in_buffer = vec![0; 1000];
        assert!(SerialDevice::restore(SerialRestoreArgs { irq, sink: sink() }, &state).is_err());
    }

    #[test]
    fn the_i8042_keeps_control_byte_and_output() {
        let mut dev = I8042::new(Box::new(|| {}));
        dev.write(4, &[0x60]);
        dev.write(0, &[0x30]);
        dev.write(4, &[0xaa]);
        let state = dev.save();
        let mut restored = I8042::restore(Box::new(|| {}), &state).unwrap();
        let mut b = [0u8];
        restored.read(0, &mut b);
        assert_eq!(b[0], 0x55, "queued self-test answer survives");
        restored.write(4, &[0x20]);
        restored.read(0, &mut b);
        assert_eq!(b[0], 0x30, "control byte survives");
    }
}
