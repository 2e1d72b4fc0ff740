//! Building a [`BuiltVm`] from a snapshot directory: the state file is checked and decoded,
//! guest memory comes from the snapshot's memory chain (mapped `MAP_PRIVATE` by default), the
//! devices are rebuilt in their saved slots with host paths given anew, then the vCPUs and the
//! VM's irqchips, PIT and clock get their saved state. Nothing runs until `start`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Cap;

use super::{BuiltVm, VmmError, msr_indices, single_malloc_arena};
use crate::config::{SeccompMode, SerialConfig, VmConfig};
use crate::device_manager::{DeviceManager, DeviceRestoreArgs};
use crate::exit::ExitCoordinator;
use crate::memory::{self, snapshot::RestoreChoice};
use crate::snapshot::{STATE_FILE, VmSnapshot, file};
use crate::vcpu::Vcpu;
use crate::vm::Vm;

/// What the restoring process decides (never taken from the snapshot).
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// How guest memory comes back.
    pub memory: RestoreChoice,
    /// The vsock device's new host socket (required if the snapshot has one).
    pub vsock_uds: Option<PathBuf>,
    /// Where the console goes.
    pub serial: SerialConfig,
    pub seccomp: SeccompMode,
    /// Log guest writes (needed for diff snapshots of the restored VM).
    pub dirty_logging: bool,
    /// A new overlay file for a disk saved with an overlay (its contents come back from the
    /// snapshot's disk layers; the file must not exist).
    pub disk_overlay: Option<PathBuf>,
}

/// Reads and checks the state file of the snapshot in `dir`.
pub fn read_snapshot(dir: &Path) -> Result<VmSnapshot, VmmError> {
    let snapshot: VmSnapshot = file::read(&dir.join(STATE_FILE))?;
    check(&snapshot)?;
    Ok(snapshot)
}

/// Reads the snapshot in `dir` and builds the VM it describes; nothing runs yet.
pub fn restore(dir: &Path, options: &RestoreOptions) -> Result<BuiltVm, VmmError> {
    restore_from(read_snapshot(dir)?, dir, options)
}

/// Builds the VM of `snapshot` (read from `dir` by [`read_snapshot`]); nothing runs yet.
pub fn restore_from(
    snapshot: VmSnapshot,
    dir: &Path,
    options: &RestoreOptions,
) -> Result<BuiltVm, VmmError> {
    let started = Instant::now();
    single_malloc_arena();
    let config = host_config(&snapshot.config, options);

    let vm = Vm::new()?;
    let backend = memory::snapshot::restore_backend(&snapshot.memory, dir, &options.memory);
    let ram = memory::create(config.mem_bytes(), &backend)?;
    vm.register_memory_with(ram.memory(), options.dirty_logging)?;
    let exits = Arc::new(ExitCoordinator::new());
    let devices = DeviceManager::restore(
        DeviceRestoreArgs {
            vm: &vm,
            memory: ram.memory(),
            serial: &config.serial,
            vsock_uds: options.vsock_uds.clone(),
            disk_overlay: options.disk_overlay.clone(),
            snapshot_dir: dir,
            exits: &exits,
        },
        &snapshot.devices,
    )?;
    let after_devices = started.elapsed();
    let tsc_scaling = vm.kvm().check_extension(Cap::TscControl);
    let vcpus = snapshot
        .machine
        .vcpus
        .iter()
        .map(|state| Vcpu::restore(vm.fd(), state, tsc_scaling))
        .collect::<Result<Vec<_>, _>>()?;
    snapshot
        .machine
        .vm
        .restore(vm.fd())
        .map_err(VmmError::RestoreVmState)?;
    let msr_indices = msr_indices(&vm)?;
    tracing::debug!(
        memory_and_devices = ?after_devices,
        total = ?started.elapsed(),
        "VM restored"
    );
    Ok(BuiltVm {
        vm,
        ram,
        vcpus,
        devices,
        exits,
        cmdline: config.cmdline.clone(),
        config,
        msr_indices,
    })
}

/// Refuses a state file whose parts disagree (it passed the checksum, so this means a bug or a
/// hand-made file, but a clear error beats a confused guest).
fn check(snapshot: &VmSnapshot) -> Result<(), VmmError> {
    let bad = |what: String| Err(VmmError::BadSnapshot(what));
    let vcpus = snapshot.machine.vcpus.len();
    if vcpus != usize::from(snapshot.config.vcpus) {
        return bad(format!(
            "{vcpus} saved vCPUs for a {}-vCPU configuration",
            snapshot.config.vcpus
        ));
    }
    if let Some((i, s)) = (0u8..)
        .zip(&snapshot.machine.vcpus)
        .find(|(i, s)| s.index != *i)
    {
        return bad(format!("vCPU state {i} is labelled vCPU {}", s.index));
    }
    if snapshot.memory.size != snapshot.config.mem_bytes() {
        return bad(format!(
            "memory manifest of {} bytes for {} MiB of RAM",
            snapshot.memory.size, snapshot.config.mem_mib
        ));
    }
    Ok(())
}

/// The saved configuration with this process's host-side settings.
fn host_config(saved: &VmConfig, options: &RestoreOptions) -> VmConfig {
    let mut config = saved.clone();
    config.serial = options.serial.clone();
    config.seccomp = options.seccomp;
    if let (Some(vsock), Some(path)) = (&mut config.vsock, &options.vsock_uds) {
        vsock.uds_path = path.clone();
    }
    config
}
