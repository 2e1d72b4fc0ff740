//! A minimal i8042 keyboard controller on ports 0x60 (data) and 0x64 (status/command).
//!
//! Why at all: a guest kernel with an i8042 driver stalls ~1 s probing an absent controller, and
//! `reboot=k` resets the machine by writing 0xFE to port 0x64 — here that becomes a clean VM
//! exit. Like Firecracker's, it answers the probe's controller commands and acknowledges keyboard
//! commands; there is no keyboard behind it and it raises no interrupts.

use std::collections::VecDeque;

use crate::devices::bus::BusDevice;

/// Offset (from 0x60) of the data port.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port, 0x64.
pub const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
/// Status bit 3: the last write was a command (not data).
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_CONTROL: u8 = 0x20;
const CMD_WRITE_CONTROL: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_INTERFACE_TEST: u8 = 0xab;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
const KEYBOARD_ACK: u8 = 0xfa;
/// Control byte: keyboard interrupt enabled, system flag, translation on.
const DEFAULT_CONTROL: u8 = 0x45;
/// Bounded so a guest cannot grow it.
const OUTPUT_CAPACITY: usize = 16;

/// The controller; `on_reset` runs when the guest asks for a CPU reset.
pub struct I8042 {
    control: u8,
    status: u8,
    output: VecDeque<u8>,
    pending: Option<u8>,
    on_reset: Box<dyn FnMut() + Send>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("control", &self.control)
            .field("status", &self.status)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

/// The controller's registers and queued output (for snapshots).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub control: u8,
    pub status: u8,
    pub output: Vec<u8>,
    pub pending: Option<u8>,
}

impl I8042 {
    /// Its state (for snapshots).
    pub fn state(&self) -> I8042State {
        I8042State {
            control: self.control,
            status: self.status,
            output: self.output.iter().copied().collect(),
            pending: self.pending,
        }
    }

    /// A controller in a saved state; output beyond the capacity is dropped.
    pub fn from_state(state: &I8042State, on_reset: Box<dyn FnMut() + Send>) -> Self {
        let mut dev = Self::new(on_reset);
        dev.control = state.control;
        dev.status = state.status;
        dev.pending = state.pending;
        dev.output
            .extend(state.output.iter().take(OUTPUT_CAPACITY).copied());
        dev
    }

    pub fn new(on_reset: Box<dyn FnMut() + Send>) -> Self {
        Self {
            control: DEFAULT_CONTROL,
            status: STATUS_SYSTEM_FLAG,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            pending: None,
            on_reset,
        }
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let full = if self.output.is_empty() {
            0
        } else {
            STATUS_OUTPUT_FULL
        };
        self.status | full
    }

    fn command(&mut self, command: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match command {
            CMD_READ_CONTROL => self.push(self.control),
            CMD_WRITE_CONTROL | CMD_WRITE_AUX => self.pending = Some(command),
            CMD_SELF_TEST => self.push(SELF_TEST_PASSED),
            CMD_INTERFACE_TEST => self.push(0x00),
            CMD_PULSE_RESET => (self.on_reset)(),
            // Enable/disable ports and the rest: accepted, nothing behind them.
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CONTROL) => self.control = byte,
            // Bytes for the (absent) mouse are dropped.
            Some(_) => {}
            // A keyboard command: acknowledge it, as a keyboard would.
            None => self.push(KEYBOARD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            DATA_OFFSET => self.data(byte),
            COMMAND_OFFSET => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn device() -> (I8042, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let dev = I8042::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        (dev, resets)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_calls_back_once() {
        let (mut dev, resets) = device();
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        dev.write(DATA_OFFSET, &[0xfe]);
        assert_eq!(
            resets.load(Ordering::SeqCst),
            1,
            "0xfe on the data port is no reset"
        );
    }

    #[test]
    fn probe_sequence_is_answered() {
        let (mut dev, _) = device();
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_PASSED);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CONTROL]);
        dev.write(DATA_OFFSET, &[0x30]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CONTROL]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x30);
        dev.write(DATA_OFFSET, &[0xff]);
        assert_eq!(read(&mut dev, DATA_OFFSET), KEYBOARD_ACK);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn output_is_bounded() {
        let (mut dev, _) = device();
        for _ in 0..1000 {
            dev.write(DATA_OFFSET, &[0xf4]);
        }
        assert_eq!(dev.output.len(), OUTPUT_CAPACITY);
    }
}
