//! Snapshots of a running VM and restoring them in a new process.
//!
//! - [`persist`]: the one trait every device implements (`save` / `restore`).
//! - [`file`]: framing of `vm.state` (magic, format version, length, SHA-256, size limit).
//! - [`VmSnapshot`]: what `vm.state` holds — the configuration, every vCPU's and the VM's KVM
//!   state, every device's state and the memory manifest.
//!
//! Taking a snapshot is [`crate::vmm::VmController::snapshot`] (pause, save, write, resume);
//! restoring is [`crate::vmm::restore`]. A snapshot directory holds `vm.state` next to the
//! memory chain files (`crate::memory::snapshot`) and disk layers (the block device's); see
//! `docs/snapshot-format.md`.

pub mod file;
pub mod persist;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::device_manager::DeviceManagerState;
use crate::memory::snapshot::MemoryManifest;
use crate::state::MachineState;

pub use persist::Persist;

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";

/// The payload of `vm.state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The VM's configuration when saved (host paths in it are informational: a restore is
    /// given its own).
    pub config: VmConfig,
    /// vCPUs, irqchips, PIT, clock.
    pub machine: MachineState,
    /// Every device, virtio slots in order.
    pub devices: DeviceManagerState,
    /// Guest memory: size, chain depth and the memory header's checksum.
    pub memory: MemoryManifest,
}
