//! A device-mapper `snapshot` target over loop devices: reads of chunks never written come
//! from the base image, writes go to the COW store, and the base is never written (its loop
//! device is read-only; the snapshot target opens its origin read-only).
//!
//! The COW store is *persistent* (`P`): its metadata lives in the COW file, so recreating the
//! snapshot over the same base and COW file gives back the same disk (a paused sandbox's disk
//! survives the teardown of its dm device). Chunks are 8 sectors (4 KiB), the same granularity
//! as the overlay backend. The COW file is sparse and sized by [`cow_size_for`]: a store that
//! fills up invalidates the snapshot, so it is sized for rewriting the whole base once.
//!
//! udev, where present, is told to leave these devices alone (`DmOptions::private()`): the host
//! must not probe a guest-written filesystem. The device is used through its devtmpfs node
//! `/dev/dm-N`, which needs no udev.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use devicemapper::{DM, DevId, DmName, DmOptions};

use super::DiskError;
use super::loops::Loop;

/// Every dm device Roost creates is named `roost-<name>`; stale ones are found by it.
pub const NAME_PREFIX: &str = "roost-";
/// COW chunk size in 512-byte sectors (4 KiB).
const CHUNK_SECTORS: u32 = 8;
/// Removal retries while something (a just-exited VMM, a transient opener) still holds it.
const REMOVE_TRIES: u32 = 20;
const REMOVE_BACKOFF: Duration = Duration::from_millis(100);

/// COW file size for a base of `base_len` bytes: the whole base once, plus the store's
/// metadata (one 4 KiB exception area per 256 chunks, i.e. 1/256 of the data) and slack.
pub fn cow_size_for(base_len: u64) -> u64 {
    base_len + base_len / 128 + (8 << 20)
}

/// Whether this kernel offers device-mapper (opening `/dev/mapper/control` may load `dm_mod`).
pub fn dm_available() -> bool {
    DM::new().is_ok()
}

fn dm() -> Result<DM, DiskError> {
    DM::new().map_err(DiskError::DmUnavailable)
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A live snapshot device. Dropping it removes the dm device and detaches its loop devices;
/// [`DmSnapshot::remove`] does the same and reports failures.
#[derive(Debug)]
pub struct DmSnapshot {
    name: String,
    device: PathBuf,
    /// Dropped after the dm device is removed (field order does not matter: `Drop` removes
    /// the dm device first).
    loops: Vec<Loop>,
    removed: bool,
}

/// The base as a block device: itself if it already is one, else a read-only loop device.
fn base_device(base: &Path, loops: &mut Vec<Loop>) -> Result<String, DiskError> {
    let meta = std::fs::metadata(base).map_err(|source| DiskError::Base {
        path: base.to_owned(),
        source,
    })?;
    if meta.file_type().is_block_device() {
        return Ok(base.display().to_string());
    }
    let lo = Loop::attach(base, true)?;
    let devno = lo.devno.clone();
    loops.push(lo);
    Ok(devno)
}

fn base_len(base: &Path) -> Result<u64, DiskError> {
    let err = |source| DiskError::Base {
        path: base.to_owned(),
        source,
    };
    let mut file = File::open(base).map_err(err)?;
    let len = file.seek(SeekFrom::End(0)).map_err(err)?;
    if len == 0 || len % 512 != 0 {
        return Err(DiskError::BaseSize {
            path: base.to_owned(),
            size: len,
        });
    }
    Ok(len)
}

/// Creates the sparse COW file (or grows an existing, smaller one: a persistent store keeps its
/// contents when the device behind it grows).
fn prepare_cow(cow: &Path, size: u64) -> Result<(), DiskError> {
    let err = |source| DiskError::Cow {
        path: cow.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(cow)
        .map_err(err)?;
    if file.metadata().map_err(err)?.len() < size {
        file.set_len(size).map_err(err)?;
    }
    Ok(())
}

/// `/dev/<DEVNAME>` of a block device number, from sysfs (waits briefly for devtmpfs).
fn node_of(name: &str, major: u32, minor: u32) -> Result<PathBuf, DiskError> {
    let uevent = format!("/sys/dev/block/{major}:{minor}/uevent");
    for _ in 0..50 {
        if let Ok(text) = std::fs::read_to_string(&uevent)
            && let Some(dev) = text.lines().find_map(|l| l.strip_prefix("DEVNAME="))
        {
            let node = Path::new("/dev").join(dev);
            if node.exists() {
                return Ok(node);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(DiskError::NoNode {
        name: name.to_owned(),
        device: format!("{major}:{minor}"),
    })
}

/// Removes dm device `full_name`, retrying while it is busy.
fn remove_device(dm: &DM, full_name: &str) -> Result<(), DiskError> {
    let dm_err = |source| DiskError::Dm {
        op: "remove",
        name: full_name.to_owned(),
        source,
    };
    let name = DmName::new(full_name).map_err(dm_err)?;
    let mut tries = 0;
    loop {
        match dm.device_remove(&DevId::Name(name), DmOptions::private()) {
            Ok(_) => return Ok(()),
            Err(err) if tries + 1 < REMOVE_TRIES => {
                tracing::debug!(%err, name = full_name, "dm remove failed; retrying");
                tries += 1;
                std::thread::sleep(REMOVE_BACKOFF);
            }
            Err(err) => return Err(dm_err(err)),
        }
    }
}

impl DmSnapshot {
    /// Creates dm device `roost-<name>`: a snapshot of `base` (read-only) whose writes go to
    /// `cow` (created sparse if missing, reused if present). On any failure everything made so
    /// far is removed again.
    pub fn create(name: &str, base: &Path, cow: &Path) -> Result<Self, DiskError> {
        if !valid_name(name) {
            return Err(DiskError::InvalidName(name.to_owned()));
        }
        let full_name = format!("{NAME_PREFIX}{name}");
        let len = base_len(base)?;
        let dm = dm()?;
        prepare_cow(cow, cow_size_for(len))?;
        let mut loops = Vec::new();
        let origin = base_device(base, &mut loops)?;
        let store = Loop::attach(cow, false)?;
        let table = format!("{origin} {} P {CHUNK_SECTORS}", store.devno);
        loops.push(store);

        let dm_err = |op| {
            let name = full_name.clone();
            move |source| DiskError::Dm { op, name, source }
        };
        let dm_name = DmName::new(&full_name).map_err(dm_err("name"))?;
        let id = DevId::Name(dm_name);
        let info = dm
            .device_create(dm_name, None, DmOptions::private())
            .map_err(dm_err("create"))?;
        // From here on the device exists: the guard removes it (and then the loops) on error.
        let mut snapshot = Self {
            name: full_name.clone(),
            device: PathBuf::new(),
            loops,
            removed: false,
        };
        dm.table_load(
            &id,
            &[(0, len / 512, "snapshot".to_owned(), table)],
            DmOptions::private(),
        )
        .map_err(dm_err("table load"))?;
        // Resuming moves the loaded table into the active slot.
        dm.device_suspend(&id, DmOptions::private())
            .map_err(dm_err("resume"))?;
        let devno = info.device();
        snapshot.device = node_of(&full_name, devno.major, devno.minor)?;
        tracing::info!(
            name = %full_name,
            device = %snapshot.device.display(),
            base = %base.display(),
            cow = %cow.display(),
            "dm snapshot created"
        );
        Ok(snapshot)
    }

    /// The device node to give the VMM (`/dev/dm-N`).
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The dm device name (`roost-<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Leaves the device in place after this handle is gone (for a CLI that creates it in one
    /// process and removes it, by name, in another). Its loop devices stay while dm uses them.
    pub fn keep(mut self) -> PathBuf {
        self.removed = true;
        std::mem::take(&mut self.device)
    }

    /// Removes the dm device, then detaches the loop devices.
    pub fn remove(mut self) -> Result<(), DiskError> {
        self.removed = true;
        let result = dm().and_then(|dm| remove_device(&dm, &self.name));
        self.loops.clear();
        result
    }

    /// Removes dm device `roost-<name>` made earlier (see [`DmSnapshot::keep`]); its
    /// autoclear loop devices detach once dm releases them.
    pub fn remove_by_name(name: &str) -> Result<(), DiskError> {
        if !valid_name(name) {
            return Err(DiskError::InvalidName(name.to_owned()));
        }
        remove_device(&dm()?, &format!("{NAME_PREFIX}{name}"))
    }
}

impl Drop for DmSnapshot {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(err) = dm().and_then(|dm| remove_device(&dm, &self.name)) {
            tracing::error!(error = %err, name = %self.name, "cannot remove dm snapshot");
        }
        self.loops.clear();
    }
}

/// Removes every dm device named `roost-*` (left by a worker that died); returns their names.
/// Their autoclear loop devices detach with them. Call at worker start, before any VM runs.
pub fn remove_stale() -> Result<Vec<String>, DiskError> {
    let dm = dm()?;
    let devices = dm.list_devices().map_err(|source| DiskError::Dm {
        op: "list",
        name: format!("{NAME_PREFIX}*"),
        source,
    })?;
    let mut removed = Vec::new();
    for (name, _, _) in devices {
        let name = name.to_string();
        if name.starts_with(NAME_PREFIX) {
            remove_device(&dm, &name)?;
            tracing::info!(%name, "removed stale dm device");
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::write(&base, [0u8; 4096]).unwrap();
        for bad in ["", "a/b", "x y", &"n".repeat(65), "../etc"] {
            let err = DmSnapshot::create(bad, &base, &dir.path().join("cow")).unwrap_err();
            assert!(matches!(err, DiskError::InvalidName(_)), "{bad:?}: {err}");
        }
        assert!(!dir.path().join("cow").exists());
        assert!(valid_name("cl-abc_123"));
    }

    #[test]
    fn unusable_bases_are_refused_before_dm_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let cow = dir.path().join("cow");
        let err = DmSnapshot::create("t", &dir.path().join("absent"), &cow).unwrap_err();
        assert!(matches!(err, DiskError::Base { .. }), "{err}");
        let odd = dir.path().join("odd");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let err = DmSnapshot::create("t", &odd, &cow).unwrap_err();
        assert!(
            matches!(err, DiskError::BaseSize { size: 1000, .. }),
            "{err}"
        );
        assert!(!cow.exists());
    }

    #[test]
    fn cow_holds_a_full_rewrite_plus_metadata() {
        let gib = 1u64 << 30;
        assert!(cow_size_for(gib) > gib + gib / 256);
    }
}
