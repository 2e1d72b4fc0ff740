//! The legacy PC devices a Linux guest probes at boot: the 16550 serial console (vm-superio) and
//! a minimal i8042 keyboard controller whose only real job is the reset command.

pub mod console;
pub mod i8042;
pub mod persist;
pub mod serial;

pub use console::ConsoleSink;
pub use i8042::{I8042, I8042State};
pub use persist::{SerialRestoreArgs, SerialSnapshot};
pub use serial::SerialDevice;
