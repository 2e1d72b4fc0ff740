//! Roost's virtual machine monitor: guest memory, vCPUs, 64-bit Linux boot, serial, i8042 and
//! virtio-mmio devices on the rust-vmm crates, with state types designed for snapshots.
//!
//! This is a synchronous library: it never sees HTTP or an async runtime; the worker drives it.

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod privileges;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vmm;
pub use config::VmConfig;
pub use exit::{ShutdownReason, VmExit};
pub use vmm::{
    BuiltVm, Privileges, RestoreOptions, RunningVm, VmController, VmmError, build, build_with,
    read_snapshot, restore, restore_from, run,
};
pub mod state;
