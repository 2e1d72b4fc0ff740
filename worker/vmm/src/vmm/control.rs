//! Pausing, resuming and snapshotting a running VM from another thread (the API thread).
//!
//! Pause parks the vCPUs (kicked out of `KVM_RUN`, see `vcpu`) and then the device thread
//! (see `event_loop`), so neither guest code nor device emulation changes memory or device
//! state while a snapshot is written. Operations are serialised by one lock; a VM that is
//! ending refuses them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::VmConfig;
use crate::device_manager::DeviceHandles;
use crate::devices::virtio::block::{LayerKind, SnapshotDiskError};
use crate::event_loop::{DevicePause, EventLoopError};
use crate::exit::ExitCoordinator;
use crate::memory::GuestRam;
use crate::memory::snapshot::{SaveError, SaveKind, SaveOptions};
use crate::snapshot::{self, STATE_FILE, VmSnapshot, file::WriteError};
use crate::state::{MachineState, StateError, VmState};
use crate::vcpu::{self, RunControl, RunState};
use crate::vm::Vm;

use super::{KICK_INTERVAL, PAUSE_TIMEOUT};

/// Why a pause, save or snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is shutting down")]
    Ending,
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(std::time::Duration),
    #[error("could not pause the device thread")]
    PauseDevices(#[source] EventLoopError),
    #[error("could not read the VM state")]
    State(#[from] StateError),
    #[error("the snapshot directory must be an absolute path: {0}")]
    RelativeDir(PathBuf),
    #[error("could not create the snapshot directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not save guest memory")]
    Memory(#[from] SaveError),
    #[error("could not write the state file")]
    WriteState(#[from] WriteError),
    #[error("could not save the disk")]
    Disk(#[from] SnapshotDiskError),
}

/// What a snapshot wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub dir: PathBuf,
    pub memory_pages_written: u64,
    pub memory_depth: u32,
    /// How long the VM was held paused for the snapshot.
    pub paused_ms: u64,
    /// Size of `vm.state`.
    pub state_bytes: u64,
    /// The disk layer files the snapshot's disk is recreated from, oldest first (absolute).
    pub disk_chain: Vec<PathBuf>,
}

/// Full or diff, with the parent's directory for a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotMode {
    Full,
    Diff { parent: PathBuf },
}

/// Everything the controller is built from (see `BuiltVm::start`).
pub(super) struct Parts {
    pub control: Arc<RunControl>,
    pub threads: Vec<libc::pthread_t>,
    pub exits: Arc<ExitCoordinator>,
    pub vm: Arc<Vm>,
    pub ram: Arc<GuestRam>,
    pub devices: DeviceHandles,
    pub device_pause: DevicePause,
    pub config: VmConfig,
}

/// Pause/resume/snapshot of one running VM.
pub struct VmController {
    parts: Parts,
    /// Serialises operations.
    op: Mutex<()>,
    paused: AtomicBool,
    /// Set when the VM is being torn down: no more operations.
    released: AtomicBool,
}

impl std::fmt::Debug for VmController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmController")
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

impl VmController {
    pub(super) fn new(parts: Parts) -> Self {
        Self {
            parts,
            op: Mutex::new(()),
            paused: AtomicBool::new(false),
            released: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, ()>, ControlError> {
        let guard = self.op.lock().unwrap_or_else(|p| p.into_inner());
        if self.released.load(Ordering::SeqCst) || self.parts.exits.has_exit() {
            return Err(ControlError::Ending);
        }
        Ok(guard)
    }

    /// The VM's configuration (as built or restored).
    pub fn config(&self) -> &VmConfig {
        &self.parts.config
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Parks every vCPU, then the device thread; a no-op when already paused.
    pub fn pause(&self) -> Result<(), ControlError> {
        let _guard = self.lock()?;
        self.pause_locked()
    }

    fn pause_locked(&self) -> Result<(), ControlError> {
        if self.is_paused() {
            return Ok(());
        }
        let control = &self.parts.control;
        control.set(RunState::Paused);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while control.parked() < self.parts.threads.len() {
            if self.parts.exits.has_exit() {
                return Err(ControlError::Ending);
            }
            if Instant::now() > deadline {
                control.set(RunState::Running);
                return Err(ControlError::PauseTimeout(PAUSE_TIMEOUT));
            }
            self.kick_all();
            std::thread::sleep(KICK_INTERVAL);
        }
        if let Err(e) = self.parts.device_pause.pause(PAUSE_TIMEOUT) {
            control.set(RunState::Running);
            return Err(ControlError::PauseDevices(e));
        }
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets a paused VM run again (devices first, then vCPUs).
    pub fn resume(&self) {
        let _guard = self.op.lock().unwrap_or_else(|p| p.into_inner());
        self.resume_locked();
    }

    fn resume_locked(&self) {
        self.parts.device_pause.resume();
        self.parts.control.set(RunState::Running);
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Stops the VM, as SIGTERM does.
    pub fn stop(&self) {
        self.parts.exits.request(crate::exit::VmExit::Stopped);
    }

    /// Ends every operation for good and releases a parked device thread (VM teardown; the
    /// caller then stops the vCPUs).
    pub(super) fn release_devices(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.parts.device_pause.resume();
    }

    /// Every vCPU's and the VM's KVM state; the VM must be paused.
    pub fn save_machine(&self) -> Result<MachineState, ControlError> {
        let vcpus = self.parts.control.collect_states(PAUSE_TIMEOUT)?;
        let vm = VmState::save(self.parts.vm.fd())?;
        Ok(MachineState { vcpus, vm })
    }

    /// Pauses the VM (if running), writes a snapshot into `dir`, and resumes it when `resume`
    /// is set and it was running before.
    pub fn snapshot(
        &self,
        dir: &Path,
        kind: &SnapshotMode,
        resume: bool,
    ) -> Result<SnapshotSummary, ControlError> {
        if !dir.is_absolute() {
            return Err(ControlError::RelativeDir(dir.to_owned()));
        }
        let _guard = self.lock()?;
        let was_running = !self.is_paused();
        let started = Instant::now();
        self.pause_locked()?;
        let result = self.write_snapshot(dir, kind, started);
        if resume && was_running {
            self.resume_locked();
        }
        result
    }

    fn write_snapshot(
        &self,
        dir: &Path,
        kind: &SnapshotMode,
        started: Instant,
    ) -> Result<SnapshotSummary, ControlError> {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let machine = self.save_machine()?;
        let (save_kind, layer_kind) = match kind {
            SnapshotMode::Full => (SaveKind::Full, LayerKind::Full),
            SnapshotMode::Diff { parent } => (SaveKind::Diff { parent }, LayerKind::Diff),
        };
        // Disk and memory chains merge at the same depth.
        let options = SaveOptions::default();
        let devices = self
            .parts
            .devices
            .save_with_disks(dir, layer_kind, options.max_depth)?;
        let memory = crate::memory::snapshot::save(
            &self.parts.ram,
            &self.parts.vm,
            dir,
            save_kind,
            &options,
        )?;
        let state = VmSnapshot {
            config: self.parts.config.clone(),
            machine,
            devices,
            memory,
        };
        let state_bytes = snapshot::file::write(&dir.join(STATE_FILE), &state)?;
        let disk_chain = state.devices.disk_chain(dir);
        Ok(SnapshotSummary {
            dir: dir.to_owned(),
            memory_pages_written: state.memory.pages_written,
            memory_depth: state.memory.depth,
            paused_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            state_bytes,
            disk_chain,
        })
    }

    fn kick_all(&self) {
        for &thread in &self.parts.threads {
            // SAFETY: the pthread_t values belong to vCPU threads that are joined only after
            // this controller's last use (`RunningVm::shutdown` stops the API thread and
            // releases the controller first), so they are valid; the kick signal's handler is
            // installed and does nothing.
            unsafe { libc::pthread_kill(thread, vcpu::kick_signal()) };
        }
    }
}
