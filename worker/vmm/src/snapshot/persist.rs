//! The one trait every snapshotted component implements, after Firecracker's `Persist`:
//! `save` turns the live object into plain serde data, `restore` builds a new object from that
//! data plus what only the restoring process can provide (guest memory, host paths, fds).
//!
//! State types sit next to the thing they snapshot (`devices/virtio/*/persist.rs`,
//! `devices/legacy/*`); the device manager composes them into
//! [`crate::device_manager::DeviceManagerState`], and [`super::VmSnapshot`] adds the vCPUs,
//! the VM's KVM state and the memory manifest.
//!
//! `save` is infallible on purpose: it runs while the VM is paused and must only copy fields.
//! Anything that can fail (reading KVM state, writing files) is not part of `save`.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A component whose state can be saved into a snapshot and restored in another process.
pub trait Persist: Sized {
    /// The saved state: plain data, serde-able, no fds or pointers.
    type State: Serialize + DeserializeOwned;
    /// What the restoring process provides (guest memory, host paths given anew, ...).
    type RestoreArgs;
    /// Why restoring failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Copies the component's state (call only while the VM is paused).
    fn save(&self) -> Self::State;

    /// Builds the component from saved state.
    fn restore(args: Self::RestoreArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
