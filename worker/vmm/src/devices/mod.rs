//! Emulated devices: the address-range bus they sit on, the legacy PC devices every x86 guest
//! probes (serial console, i8042), and the virtio-mmio devices.
//!
//! The VM core owns `bus` and `legacy`; `virtio` is a separate seam (see the crate README).

pub mod bus;
pub mod legacy;
pub mod virtio;
