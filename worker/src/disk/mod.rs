//! Copy-on-write root disks for sandboxes, on the host side.
//!
//! Two backends over one read-only template image (see `docs/disks.md`):
//! - **overlay** (default): the VMM's own virtio-blk overlay (`roost_vmm` block device with
//!   `DriveConfig::overlay`); nothing to set up here beyond choosing the overlay path.
//! - **dm-snapshot**: a device-mapper `snapshot` target over two loop devices (the base image
//!   read-only, a sparse COW file writable), for hosts whose kernel has device-mapper; the VMM
//!   then gets the resulting `/dev/dm-N` as a plain writable disk. [`DmSnapshot`] creates it
//!   and removes it (with its loop devices) on every path, and [`remove_stale`] clears what a
//!   crashed worker left behind.

mod dm_snapshot;
mod loops;

pub use dm_snapshot::{
    DmDevice, DmSnapshot, NAME_PREFIX, cow_size_for, dm_available, list, remove_stale,
};

use std::path::PathBuf;

/// Why a device-mapper disk could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "device-mapper is not available: cannot open /dev/mapper/control (needs root and the \
         dm_mod module: `modprobe dm_mod dm_snapshot`; `roost doctor` checks this host)"
    )]
    DmUnavailable(#[source] devicemapper::DmError),
    #[error(
        "this kernel's device-mapper has no `snapshot` target: load it with `modprobe dm_snapshot` \
         (as root)"
    )]
    NoSnapshotTarget(#[source] devicemapper::DmError),
    #[error(
        "invalid disk name {0:?}: use 1-64 characters from a-z, A-Z, 0-9, '-', '_' (it becomes dm device roost-NAME)"
    )]
    InvalidName(String),
    #[error("cannot use base image {path}")]
    Base {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("base image {path} is empty or not a whole number of 512-byte sectors ({size} bytes)")]
    BaseSize { path: PathBuf, size: u64 },
    #[error("cannot prepare the COW file {path}")]
    Cow {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach a loop device to {path}")]
    Loop {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device-mapper {op} of {name} failed")]
    Dm {
        op: &'static str,
        name: String,
        #[source]
        source: devicemapper::DmError,
    },
    #[error("there is no dm device {0} (`roost disk dm list` shows the roost- devices)")]
    NoSuchDevice(String),
    #[error("the device node of dm device {name} ({device}) did not appear under /dev")]
    NoNode { name: String, device: String },
}
