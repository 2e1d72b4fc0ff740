//! The legacy PC devices a Linux guest probes at boot: the 16550 serial console (vm-superio) and
//! a minimal i8042 keyboard controller whose only real job is the reset command.
