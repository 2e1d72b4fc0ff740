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

use devicemapper::{DM, DevId, Device, DmName, DmNameBuf, DmOptions};

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

/// Whether the kernel has the `snapshot` target loaded (the kernel loads `dm_snapshot` itself
/// on the first table that needs it, where module autoloading works).
fn has_snapshot_target(dm: &DM) -> bool {
    dm.list_versions()
        .is_ok_and(|targets| targets.iter().any(|(name, ..)| name == "snapshot"))
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

/// The `major:minor` block devices a dm table line's parameters name that are loop devices
/// (for a snapshot: the COW store, and the origin when the base is a file).
fn loops_in(params: &str) -> Vec<String> {
    params
        .split_whitespace()
        .filter(|word| {
            word.split_once(':').is_some_and(|(a, b)| {
                a.parse::<u32>().is_ok()
                    && b.parse::<u32>().is_ok()
                    && Path::new(&format!("/sys/dev/block/{word}/loop")).exists()
            })
        })
        .map(str::to_owned)
        .collect()
}

/// `/dev/<DEVNAME>` of block device `major:minor`, if it is there.
fn node_of_devno(devno: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/sys/dev/block/{devno}/uevent")).ok()?;
    let dev = text.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    Some(Path::new("/dev").join(dev))
}

/// Whether loop device `major:minor` still has a backing file.
fn loop_attached(devno: &str) -> bool {
    Path::new(&format!("/sys/dev/block/{devno}/loop/backing_file")).exists()
}

/// Detaches loop devices `devnos` once dm has released them: autoclear normally does it when dm
/// closes them; one that is still attached a moment later (attached without autoclear, e.g. by
/// hand) is detached here. Returns the loop device nodes that were freed.
fn release_loops(devnos: &[String]) -> Result<Vec<PathBuf>, DiskError> {
    let mut freed = Vec::new();
    for devno in devnos {
        let node = node_of_devno(devno).unwrap_or_else(|| PathBuf::from(devno));
        let mut tries = 0;
        while loop_attached(devno) && tries < 10 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        if loop_attached(devno) {
            let detach = loopdev::LoopDevice::open(&node).and_then(|lo| lo.detach());
            if let Err(source) = detach
                && loop_attached(devno)
            {
                return Err(DiskError::Loop { path: node, source });
            }
        }
        freed.push(node);
    }
    Ok(freed)
}

/// A `roost-*` dm device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmDevice {
    /// `roost-<name>`.
    pub name: String,
    /// Its node, `/dev/dm-N` (`major:minor` if devtmpfs has none).
    pub device: PathBuf,
    /// The active table's parameters (`<origin> <cow> P 8` for a snapshot).
    pub table: String,
    /// The target's status (for a snapshot: `used/total metadata`, or `Invalid` when full).
    pub status: String,
    /// The loop device nodes it uses.
    pub loops: Vec<PathBuf>,
}

/// Table parameters and status of dm device `full_name`.
fn table_and_status(dm: &DM, full_name: &str) -> Result<(String, String), DiskError> {
    let dm_err = |op| {
        let name = full_name.to_owned();
        move |source| DiskError::Dm { op, name, source }
    };
    let name = DmName::new(full_name).map_err(dm_err("name"))?;
    let id = DevId::Name(name);
    let join = |lines: Vec<(u64, u64, String, String)>| {
        lines
            .into_iter()
            .map(|(_, _, _, params)| params)
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (_, table) = dm
        .table_status(
            &id,
            DmOptions::default().set_flags(devicemapper::DmFlags::DM_STATUS_TABLE),
        )
        .map_err(dm_err("table"))?;
    let (_, status) = dm
        .table_status(&id, DmOptions::default())
        .map_err(dm_err("status"))?;
    Ok((join(table), join(status)))
}

/// Every dm device on the host (callers keep the `roost-*` ones).
fn list_all(dm: &DM) -> Result<Vec<(DmNameBuf, Device, Option<u32>)>, DiskError> {
    dm.list_devices().map_err(|source| DiskError::Dm {
        op: "list",
        name: format!("{NAME_PREFIX}*"),
        source,
    })
}

/// Every dm device named `roost-*`, by name.
pub fn list() -> Result<Vec<DmDevice>, DiskError> {
    let dm = dm()?;
    let devices = list_all(&dm)?;
    let mut out = Vec::new();
    for (name, devno, _) in devices {
        let name = name.to_string();
        if !name.starts_with(NAME_PREFIX) {
            continue;
        }
        let devno = format!("{}:{}", devno.major, devno.minor);
        let (table, status) = table_and_status(&dm, &name)?;
        let loops = loops_in(&table)
            .iter()
            .map(|d| node_of_devno(d).unwrap_or_else(|| PathBuf::from(d)))
            .collect();
        out.push(DmDevice {
            name,
            device: node_of_devno(&devno).unwrap_or_else(|| PathBuf::from(devno)),
            table,
            status,
            loops,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes dm device `full_name` and then frees the loop devices its table used; returns them.
fn remove_with_loops(dm: &DM, full_name: &str) -> Result<Vec<PathBuf>, DiskError> {
    let loops = table_and_status(dm, full_name)
        .map(|(table, _)| loops_in(&table))
        .unwrap_or_default();
    remove_device(dm, full_name)?;
    release_loops(&loops)
}

/// Whether dm device `full_name` exists (a failed listing counts as yes: the caller then
/// reports its own error).
fn exists(dm: &DM, full_name: &str) -> bool {
    dm.list_devices().map_or(true, |devices| {
        devices
            .iter()
            .any(|(name, ..)| name.to_string() == full_name)
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
            Err(_) if !exists(dm, full_name) => {
                return Err(DiskError::NoSuchDevice(full_name.to_owned()));
            }
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
        .map_err(|source| {
            if has_snapshot_target(&dm) {
                dm_err("table load")(source)
            } else {
                DiskError::NoSnapshotTarget(source)
            }
        })?;
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

    /// Removes dm device `roost-<name>` made earlier (see [`DmSnapshot::keep`]) and frees the
    /// loop devices it used (autoclear detaches them once dm releases them; one still attached
    /// is detached). Returns those loop devices.
    pub fn remove_by_name(name: &str) -> Result<Vec<PathBuf>, DiskError> {
        if !valid_name(name) {
            return Err(DiskError::InvalidName(name.to_owned()));
        }
        remove_with_loops(&dm()?, &format!("{NAME_PREFIX}{name}"))
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

/// Removes every dm device named `roost-*` (left by a worker that died) and the loop devices
/// they used; returns each device's name with its loop devices. Call at worker start, before
/// any VM runs.
pub fn remove_stale() -> Result<Vec<(String, Vec<PathBuf>)>, DiskError> {
    let dm = dm()?;
    let devices = list_all(&dm)?;
    let mut removed = Vec::new();
    for (name, _, _) in devices {
        let name = name.to_string();
        if name.starts_with(NAME_PREFIX) {
            let loops = remove_with_loops(&dm, &name)?;
            tracing::info!(%name, ?loops, "removed stale dm device");
            removed.push((name, loops));
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
    fn only_device_numbers_of_a_table_are_loop_candidates() {
        // No `/sys/dev/block/0:0/loop` anywhere: nothing qualifies, and words that are not
        // `major:minor` are never looked up.
        assert!(loops_in("0:0 0:0 P 8").is_empty());
        assert!(loops_in("/dev/x P 8 a:b").is_empty());
    }

    #[test]
    fn cow_holds_a_full_rewrite_plus_metadata() {
        let gib = 1u64 << 30;
        assert!(cow_size_for(gib) > gib + gib / 256);
    }
}
