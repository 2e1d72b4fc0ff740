//! Roost's virtual machine monitor: guest memory, vCPUs, 64-bit Linux boot, serial, i8042 and
//! virtio-mmio devices on the rust-vmm crates, with state types designed for snapshots.
//!
//! This is a synchronous library: it never sees HTTP or an async runtime; the worker drives it.

pub mod devices;
