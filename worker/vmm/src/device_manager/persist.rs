//! Saving every device of a running VM into one [`DeviceManagerState`] and rebuilding the
//! devices of a restored VM from it.
//!
//! Each device saves and restores itself through [`Persist`]; this module only composes them
//! and puts the restored devices back in the same places (virtio slot `i` gets the same MMIO
//! window and GSI as when saved, so the guest's drivers find them where they were). Host-side
//! ends are given anew by the restoring process ([`DeviceRestoreArgs`]): serial log, vsock socket.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::{
    DeviceError, DeviceHandles, DeviceManager, VirtioHandle, i8042_reset, serial_host_side,
};
use crate::config::SerialConfig;
use crate::devices::legacy::{I8042, I8042State, SerialDevice, SerialRestoreArgs, SerialSnapshot};
use crate::devices::virtio::block::{LayerKind, SnapshotDiskError};
use crate::devices::virtio::net::{Net, NetRestoreArgs, NetState};
use crate::devices::virtio::{
    self, BlockState, MmioRestoreArgs, MmioTransport, MmioTransportState, Rng, RngState,
    VirtioDevice, VirtioDeviceState, Vsock, VsockRestoreArgs, VsockState,
};
use crate::exit::ExitCoordinator;
use crate::snapshot::Persist;
use crate::vm::Vm;

/// The saved state of one virtio device, by type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceSnapshot {
    Block(BlockState),
    Vsock(VsockState),
    Rng(RngState),
    Net(NetState),
}

impl VirtioDeviceSnapshot {
    fn virtio(&self) -> &VirtioDeviceState {
        match self {
            VirtioDeviceSnapshot::Block(s) => &s.virtio,
            VirtioDeviceSnapshot::Vsock(s) => &s.virtio,
            VirtioDeviceSnapshot::Rng(s) => &s.virtio,
            VirtioDeviceSnapshot::Net(s) => &s.virtio,
        }
    }
}

/// One virtio slot: its transport registers and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState {
    pub name: String,
    pub transport: MmioTransportState,
    pub device: VirtioDeviceSnapshot,
}

/// Every device of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceManagerState {
    pub serial: Option<SerialSnapshot>,
    pub i8042: Option<I8042State>,
    /// In slot order.
    pub virtio: Vec<VirtioSlotState>,
}

impl DeviceManagerState {
    /// The layer files of the saved disks' chains, oldest first, with paths relative to the
    /// snapshot directory `dir` made absolute.
    pub fn disk_chain(&self, dir: &Path) -> Vec<PathBuf> {
        self.virtio
            .iter()
            .filter_map(|slot| match &slot.device {
                VirtioDeviceSnapshot::Block(state) => state.disk.as_ref(),
                _ => None,
            })
            .flat_map(|manifest| &manifest.layers)
            .map(|layer| dir.join(&layer.path))
            .collect()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VirtioHandle {
    /// The device's state (call while the device thread is parked).
    pub fn save(&self) -> VirtioDeviceSnapshot {
        match self {
            VirtioHandle::Block(d) => VirtioDeviceSnapshot::Block(lock(d).state()),
            VirtioHandle::Vsock(d) => VirtioDeviceSnapshot::Vsock(lock(d).save()),
            VirtioHandle::Rng(d) => VirtioDeviceSnapshot::Rng(lock(d).save()),
            VirtioHandle::Net(d) => VirtioDeviceSnapshot::Net(lock(d).save()),
        }
    }
}

impl DeviceHandles {
    /// Every device's state; call only while the vCPUs and the device thread are parked.
    pub fn save(&self) -> DeviceManagerState {
        DeviceManagerState {
            serial: self.serial.as_ref().map(|s| lock(s).save()),
            i8042: self.i8042.as_ref().map(|d| lock(d).save()),
            virtio: self
                .virtio
                .iter()
                .map(|slot| VirtioSlotState {
                    name: slot.name.to_owned(),
                    transport: lock(&slot.transport).save(),
                    device: slot.device.save(),
                })
                .collect(),
        }
    }

    /// [`DeviceHandles::save`] with every overlay disk's layer written into snapshot
    /// directory `dir` (full or the clusters written since the last snapshot; a chain deeper
    /// than `max_depth` is merged into that directory).
    pub fn save_with_disks(
        &self,
        dir: &Path,
        kind: LayerKind,
        max_depth: usize,
    ) -> Result<DeviceManagerState, SnapshotDiskError> {
        let mut state = self.save();
        let mut disks = 0;
        for (slot, saved) in self.virtio.iter().zip(&mut state.virtio) {
            if let VirtioHandle::Block(block) = &slot.device {
                // One layer file per snapshot directory: a second overlay disk would overwrite
                // the first's (the VMM attaches one disk today).
                disks += 1;
                if disks > 1 {
                    return Err(SnapshotDiskError::TooManyDisks);
                }
                saved.device =
                    VirtioDeviceSnapshot::Block(lock(block).state_with_disk(dir, kind, max_depth)?);
            }
        }
        Ok(state)
    }
}

/// What the restoring process provides for the devices.
#[derive(Debug)]
pub struct DeviceRestoreArgs<'a> {
    pub vm: &'a Vm,
    pub memory: &'a GuestMemoryMmap,
    /// Where the console goes now.
    pub serial: &'a SerialConfig,
    /// The vsock device's new host socket (required when the snapshot has a vsock device).
    pub vsock_uds: Option<PathBuf>,
    /// A new (absent) copy-on-write overlay file for the disk, required when the snapshot's
    /// disk had an overlay: its contents are recreated from the snapshot's disk layers.
    pub disk_overlay: Option<PathBuf>,
    /// The snapshot directory being restored (its disk layers are named relative to it).
    pub snapshot_dir: &'a Path,
    pub exits: &'a Arc<ExitCoordinator>,
}

fn restore_error(
    name: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> DeviceError {
    move |e| DeviceError::Restore(name, e)
}

impl DeviceManager {
    /// Rebuilds the devices of `state` on a new VM, in their saved slots, activated as they
    /// were; a vsock device then resets the guest's connections (their host ends are gone).
    pub fn restore(
        args: DeviceRestoreArgs<'_>,
        state: &DeviceManagerState,
    ) -> Result<Self, DeviceError> {
        let mut manager = DeviceManager::new()?;
        let (irq, sink) = serial_host_side(args.vm, args.serial, args.exits)?;
        let serial = match &state.serial {
            Some(saved) => SerialDevice::restore(SerialRestoreArgs { irq, sink }, saved)
                .map_err(|e| DeviceError::Restore("serial", Box::new(e)))?,
            None => SerialDevice::new(irq, sink),
        };
        let reset = i8042_reset(args.exits);
        let i8042 = match &state.i8042 {
            Some(saved) => match I8042::restore(reset, saved) {
                Ok(dev) => dev,
                Err(never) => match never {},
            },
            None => I8042::new(reset),
        };
        manager.place_legacy(serial, i8042)?;

        let mut vsocks = Vec::new();
        for slot in &state.virtio {
            let (name, handle) = restore_device(&slot.device, &args)?;
            if let VirtioHandle::Vsock(v) = &handle {
                vsocks.push(v.clone());
            }
            let device = handle.device();
            let memory = args.memory.clone();
            let device_state = slot.device.virtio().clone();
            manager.place_virtio(args.vm, name, handle, |interrupt| {
                MmioTransport::restore(
                    MmioRestoreArgs {
                        mem: memory,
                        device,
                        interrupt,
                        device_state,
                    },
                    &slot.transport,
                )
                .map_err(|e| DeviceError::Restore(name, Box::new(e)))
            })?;
        }
        for vsock in vsocks {
            let mut vsock = lock(&vsock);
            if vsock.is_activated() {
                vsock
                    .send_transport_reset()
                    .map_err(|e| DeviceError::Restore("vsock", Box::new(e)))?;
            }
        }
        Ok(manager)
    }
}

/// One device of a snapshot, restored and not activated.
fn restore_device(
    saved: &VirtioDeviceSnapshot,
    args: &DeviceRestoreArgs<'_>,
) -> Result<(&'static str, VirtioHandle), DeviceError> {
    Ok(match saved {
        VirtioDeviceSnapshot::Block(state) => {
            let block = restore_block(state, args.snapshot_dir, args.disk_overlay.as_deref())
                .map_err(restore_error("block"))?;
            ("block", VirtioHandle::Block(block))
        }
        VirtioDeviceSnapshot::Vsock(state) => {
            let uds_path = args.vsock_uds.clone().ok_or(DeviceError::MissingHostPath(
                "vsock",
                "give the new vsock socket path (--vsock-uds)",
            ))?;
            let vsock = Vsock::restore(VsockRestoreArgs { uds_path }, state)
                .map_err(|e| DeviceError::Restore("vsock", Box::new(e)))?;
            ("vsock", VirtioHandle::Vsock(Arc::new(Mutex::new(vsock))))
        }
        VirtioDeviceSnapshot::Rng(state) => {
            let rng =
                Rng::restore((), state).map_err(|e| DeviceError::Restore("rng", Box::new(e)))?;
            ("rng", VirtioHandle::Rng(Arc::new(Mutex::new(rng))))
        }
        VirtioDeviceSnapshot::Net(state) => {
            // The tap of the saved name in this VMM's namespace (see `NetRestoreArgs`).
            let net = Net::restore(NetRestoreArgs::default(), state)
                .map_err(|e| DeviceError::Restore("net", Box::new(e)))?;
            ("net", VirtioHandle::Net(Arc::new(Mutex::new(net))))
        }
    })
}

/// The block device of a snapshot (see [`virtio::Block::reopen`]), checked against the saved
/// capacity, with the saved features acknowledged.
fn restore_block(
    state: &BlockState,
    snapshot_dir: &Path,
    new_overlay: Option<&Path>,
) -> Result<Arc<Mutex<virtio::Block>>, Box<dyn std::error::Error + Send + Sync>> {
    let block = Arc::new(Mutex::new(virtio::Block::reopen(
        state,
        snapshot_dir,
        new_overlay,
    )?));
    {
        let mut dev = lock(&block);
        let found = dev.capacity_sectors();
        if found != state.capacity_sectors {
            return Err(format!(
                "disk {} has {found} sectors, the snapshot's had {}",
                state.path.display(),
                state.capacity_sectors
            )
            .into());
        }
        let avail = dev.avail_features();
        dev.set_acked_features(state.virtio.acked_features & avail);
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{Block, BlockConfig};

    /// A VM whose only device is a disk in `state`.
    fn with_disk(state: BlockState) -> DeviceManagerState {
        DeviceManagerState {
            serial: None,
            i8042: None,
            virtio: vec![slot("block", VirtioDeviceSnapshot::Block(state))],
        }
    }

    fn slot(name: &str, device: VirtioDeviceSnapshot) -> VirtioSlotState {
        VirtioSlotState {
            name: name.to_owned(),
            transport: MmioTransportState {
                device_status: 0,
                features_select: 0,
                acked_features_select: 0,
                queue_select: 0,
                config_generation: 0,
                queues: Vec::new(),
                interrupt_status: 0,
            },
            device,
        }
    }

    #[test]
    fn the_disk_chain_lists_every_layer_file_with_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 128 * 1024]).unwrap();
        let mut blk = Block::new(BlockConfig {
            path: base.clone(),
            read_only: false,
            overlay: Some(dir.path().join("live.cow")),
        })
        .unwrap();
        let (g1, g2) = (dir.path().join("g1"), dir.path().join("g2"));
        std::fs::create_dir_all(&g1).unwrap();
        std::fs::create_dir_all(&g2).unwrap();
        blk.state_with_disk(&g1, LayerKind::Full, 4).unwrap();
        let devices = with_disk(blk.state_with_disk(&g2, LayerKind::Diff, 4).unwrap());
        assert_eq!(
            devices.disk_chain(&g2),
            [g1.join("disk0.layer"), g2.join("disk0.layer")],
            "the parent's layer keeps its absolute path; the new one is made absolute"
        );

        let mut ro = Block::new(BlockConfig {
            path: base,
            read_only: true,
            overlay: None,
        })
        .unwrap();
        let devices = with_disk(ro.state_with_disk(&g2, LayerKind::Full, 4).unwrap());
        assert!(
            devices.disk_chain(&g2).is_empty(),
            "a read-only disk has no layers"
        );
    }
}
