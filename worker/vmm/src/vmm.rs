//! Building a VM from a [`VmConfig`] and running it to its end.
//!
//! [`build`] does everything that needs privileges or can fail cleanly before the guest runs:
//! /dev/kvm, guest memory, the serial log, devices and their sockets, the kernel, boot
//! structures and vCPUs. [`BuiltVm::start`] then drops privileges, spawns the device thread and
//! one thread per vCPU (each under its seccomp filter). [`RunningVm::wait`] returns how the VM
//! ended after every thread has been joined; dropping it releases every fd and mapping.
//!
//! [`restore`] builds a [`BuiltVm`] from a snapshot directory instead of a kernel; the
//! running VM's [`VmController`] pauses, resumes and snapshots it (the API socket uses it).

mod control;
mod restore;

pub use control::{ControlError, SnapshotMode, SnapshotSummary, VmController};
pub use restore::{RestoreOptions, read_snapshot, restore, restore_from};

use std::fs::File;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::arch::{mptable, regs};
use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{EventLoopError, RunningEventLoop};
use crate::exit::{ExitCoordinator, PanicGuard, VmExit};
use crate::layout;
use crate::memory::{self, GuestRam, MemoryBackend, MemoryError};
use crate::privileges::{self, PrivilegeError};
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::snapshot::file::ReadError;
use crate::state::MachineState;
use crate::vcpu::{self, RunControl, RunState, Vcpu, VcpuError, VcpuShared};
use crate::vm::{Vm, VmError};

/// How long pausing (or saving) may take before it is reported as failed.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VM whose page server was lost may take to stop before its process is ended.
const PAGER_LOST_GRACE: Duration = Duration::from_secs(2);
/// The process exit code then: `roost vm run`'s "the VM failed while running".
const PAGER_LOST_EXIT_CODE: i32 = 4;

/// How often a stopping vCPU thread is kicked until it leaves `KVM_RUN`.
pub(crate) const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// Why a VM could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    #[error("could not create the VM")]
    Vm(#[from] VmError),
    #[error("could not create guest memory")]
    Memory(#[from] MemoryError),
    #[error("could not load the guest kernel")]
    Boot(#[from] BootError),
    #[error("could not write the MP table")]
    MpTable(#[from] mptable::MpTableError),
    #[error("could not write the boot page tables and descriptor tables")]
    BootStructures(#[source] vm_memory::GuestMemoryError),
    #[error("could not set up a vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("could not attach the devices")]
    Devices(#[from] DeviceError),
    #[error("could not set up the device event loop")]
    EventLoop(#[from] EventLoopError),
    #[error("could not set up seccomp")]
    Seccomp(#[from] SeccompError),
    #[error("could not drop privileges")]
    Privileges(#[from] PrivilegeError),
    #[error("could not spawn the thread of vCPU {0}")]
    SpawnVcpu(u8, #[source] std::io::Error),
    #[error("could not spawn the VMM's {0} thread")]
    SpawnThread(&'static str, #[source] std::io::Error),
    #[error("could not read the snapshot")]
    ReadSnapshot(#[from] ReadError),
    #[error("could not restore the VM's interrupt controllers, PIT and clock")]
    RestoreVmState(#[source] crate::state::RestoreError),
    #[error("the snapshot is inconsistent: {0}")]
    BadSnapshot(String),
}

/// A VM that is fully set up and has not run yet.
pub struct BuiltVm {
    vm: Vm,
    ram: GuestRam,
    vcpus: Vec<Vcpu>,
    devices: DeviceManager,
    exits: Arc<ExitCoordinator>,
    config: VmConfig,
    cmdline: String,
    msr_indices: Vec<u32>,
}

impl std::fmt::Debug for BuiltVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltVm")
            .field("vcpus", &self.vcpus.len())
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

/// Builds a VM; nothing runs yet. Guest memory has no dirty logging (see [`build_with`]).
pub fn build(config: &VmConfig) -> Result<BuiltVm, VmmError> {
    build_with(config, false)
}

/// Builds a VM; with `dirty_logging`, KVM logs guest writes so diff snapshots are possible.
pub fn build_with(config: &VmConfig, dirty_logging: bool) -> Result<BuiltVm, VmmError> {
    let started = Instant::now();
    config.validate()?;
    single_malloc_arena();
    let vm = Vm::new()?;
    let ram = memory::create(config.mem_bytes(), &MemoryBackend::Anonymous)?;
    vm.register_memory_with(ram.memory(), dirty_logging)?;
    let memory = ram.memory();
    let exits = Arc::new(ExitCoordinator::new());

    let mut devices = DeviceManager::new()?;
    devices.attach_legacy(&vm, config, &exits)?;
    let mut cmdline = boot::cmdline(&config.cmdline)?;
    devices.attach_virtio_devices(&vm, memory, config, &mut cmdline)?;

    let cmdline_text = cmdline
        .as_cstring()
        .map_err(|e| VmmError::Boot(BootError::Cmdline(e)))?
        .to_string_lossy()
        .into_owned();
    regs::write_boot_structures(memory).map_err(VmmError::BootStructures)?;
    mptable::write(memory, layout::MPTABLE_START, config.vcpus)?;
    boot::write_boot_params(memory, config.mem_bytes(), &cmdline)?;
    let mut kernel = File::open(&config.kernel).map_err(|source| BootError::OpenKernel {
        path: config.kernel.clone(),
        source,
    })?;
    let before_kernel = started.elapsed();
    let entry = boot::load_kernel(memory, &mut kernel)?;
    let before_vcpus = started.elapsed();
    let msr_indices = msr_indices(&vm)?;
    let vcpus = (0..config.vcpus)
        .map(|index| Vcpu::new(vm.fd(), vm.supported_cpuid(), index, config.vcpus, entry))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::debug!(
        vm_and_devices = ?before_kernel,
        kernel_loaded = ?before_vcpus,
        total = ?started.elapsed(),
        "VM built"
    );
    Ok(BuiltVm {
        vm,
        ram,
        vcpus,
        devices,
        exits,
        config: config.clone(),
        cmdline: cmdline_text,
        msr_indices,
    })
}

/// KVM's list of MSRs to save.
fn msr_indices(vm: &Vm) -> Result<Vec<u32>, VmmError> {
    Ok(vm
        .kvm()
        .get_msr_index_list()
        .map_err(VmError::MsrIndexList)?
        .as_slice()
        .to_vec())
}

/// Whether [`BuiltVm::start`] drops the process's privileges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privileges {
    /// Drop all capabilities and set no_new_privs (the VMM process).
    Drop,
    /// Keep them (an embedding process that still needs them; tests).
    Keep,
}

impl BuiltVm {
    /// The kernel command line the guest gets (with the virtio-mmio entries).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Makes SIGTERM, SIGINT and SIGHUP stop the VM cleanly (see [`crate::signals`]); call
    /// before [`BuiltVm::start`], on the thread that starts it.
    pub fn stop_on_signals(&self) -> std::io::Result<()> {
        crate::signals::stop_on_signals(self.exits.clone())
    }

    /// Drops privileges (if asked) and starts the device and vCPU threads.
    pub fn start(self, privileges: Privileges) -> Result<RunningVm, VmmError> {
        vcpu::install_kick_handler()?;
        let vcpu_filter = seccomp::compile(ThreadKind::Vcpu, self.config.seccomp)?;
        let device_filter = seccomp::compile(ThreadKind::Device, self.config.seccomp)?;
        if privileges == Privileges::Drop {
            privileges::drop_all()?;
        }
        let control = Arc::new(RunControl::new(self.vcpus.len()));
        let shared = VcpuShared {
            pio: Arc::new(self.devices.pio),
            mmio: Arc::new(self.devices.mmio),
            exits: self.exits.clone(),
            control: control.clone(),
            msr_indices: Arc::new(self.msr_indices),
        };
        let vm = Arc::new(self.vm);
        let ram = Arc::new(self.ram);
        let mut running = RunningVm {
            vcpu_threads: Vec::with_capacity(self.vcpus.len()),
            event_loop: None,
            control,
            exits: self.exits.clone(),
            started: Instant::now(),
            controller: None,
            api: None,
            _ram: ram.clone(),
            _vm: vm.clone(),
        };
        let event_loop = self
            .devices
            .event_loop
            .spawn(device_filter, self.exits.clone())?;
        let device_pause = event_loop.pauser();
        running.event_loop = Some(event_loop);
        // A lost page server would leave vCPUs blocked in page faults forever: fail the VM
        // with the reason instead, and end the process if the stuck threads keep it alive.
        let exits = self.exits.clone();
        ram.watch_pager(
            move |reason| {
                exits.request(VmExit::Error {
                    detail: format!("the page server serving guest memory was lost: {reason}"),
                });
            },
            PAGER_LOST_GRACE,
            PAGER_LOST_EXIT_CODE,
        )
        .map_err(|e| VmmError::SpawnThread("page-server watchdog", e))?;
        for vcpu in self.vcpus {
            let index = vcpu.index();
            let shared = shared.clone();
            let filter = vcpu_filter.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let _guard = PanicGuard::new(shared.exits.clone(), format!("vcpu{index}"));
                    if let Err(e) = seccomp::install(filter.as_ref()) {
                        shared.exits.request(VmExit::Error {
                            detail: format!("vCPU {index}: {e}"),
                        });
                        return;
                    }
                    vcpu::run(vcpu, &shared);
                });
            match thread {
                Ok(thread) => running.vcpu_threads.push(thread),
                Err(e) => {
                    // `running` stops and joins what did start when dropped.
                    running.exits.request(VmExit::Error {
                        detail: format!("could not spawn vCPU {index}"),
                    });
                    return Err(VmmError::SpawnVcpu(index, e));
                }
            }
        }
        running.controller = Some(Arc::new(VmController::new(control::Parts {
            control: running.control.clone(),
            threads: running
                .vcpu_threads
                .iter()
                .map(|t| t.as_pthread_t())
                .collect(),
            exits: running.exits.clone(),
            vm,
            ram,
            devices: self.devices.handles,
            device_pause,
            config: self.config,
        })));
        Ok(running)
    }
}

/// A VM whose threads are running.
#[derive(Debug)]
pub struct RunningVm {
    vcpu_threads: Vec<JoinHandle<()>>,
    event_loop: Option<RunningEventLoop>,
    control: Arc<RunControl>,
    exits: Arc<ExitCoordinator>,
    started: Instant,
    /// Pause/resume/snapshot; `None` only while starting.
    controller: Option<Arc<VmController>>,
    /// The API socket's thread, if serving.
    api: Option<crate::api::ApiServer>,
    _ram: Arc<GuestRam>,
    _vm: Arc<Vm>,
}

impl RunningVm {
    /// Pauses, resumes and snapshots this VM from any thread.
    pub fn controller(&self) -> Arc<VmController> {
        match &self.controller {
            Some(c) => c.clone(),
            None => unreachable!("start() sets the controller before returning the VM"),
        }
    }

    /// Serves the VMM API on `listener` (see [`crate::api`]) until the VM ends.
    pub fn serve_api(&mut self, listener: crate::api::ApiListener) -> Result<(), VmmError> {
        let filter = seccomp::compile(ThreadKind::Api, self.config_seccomp())?;
        let server = crate::api::ApiServer::spawn(listener, self.controller(), filter)
            .map_err(|e| VmmError::SpawnThread("API", e))?;
        self.api = Some(server);
        Ok(())
    }

    fn config_seccomp(&self) -> crate::config::SeccompMode {
        self.controller().config().seccomp
    }

    /// Blocks until the VM ends, stops every thread and says how it ended.
    pub fn wait(mut self) -> VmExit {
        let exit = self.exits.wait();
        tracing::debug!(%exit, after = ?self.started.elapsed(), "VM ended");
        self.shutdown();
        exit
    }

    /// A handle that can stop the VM from another thread.
    pub fn stopper(&self) -> Arc<ExitCoordinator> {
        self.exits.clone()
    }

    /// Pauses every vCPU and the device thread. Returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.controller().pause()
    }

    /// Pauses the VM (if it is not already) and reads every vCPU's and the VM's KVM state. The
    /// VM stays paused: call [`RunningVm::resume`] to go on.
    pub fn save_state(&self) -> Result<MachineState, ControlError> {
        let controller = self.controller();
        controller.pause()?;
        controller.save_machine()
    }

    /// Lets the paused VM run again.
    pub fn resume(&self) {
        self.controller().resume();
    }

    fn live_vcpus(&self) -> usize {
        self.vcpu_threads
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    fn kick_all(&self) {
        for thread in self.vcpu_threads.iter().filter(|t| !t.is_finished()) {
            // SAFETY: the pthread_t belongs to a thread we have not joined, so it is valid; the
            // kick signal's handler is installed and does nothing.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), vcpu::kick_signal()) };
        }
    }

    fn shutdown(&mut self) {
        // The API thread kicks vCPU threads: it must be gone before they are joined.
        if let Some(mut api) = self.api.take() {
            api.stop();
        }
        if let Some(controller) = &self.controller {
            controller.release_devices();
        }
        self.control.set(RunState::Stopping);
        while self.live_vcpus() > 0 {
            self.kick_all();
            std::thread::sleep(KICK_INTERVAL);
        }
        for thread in self.vcpu_threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        if let Some(mut event_loop) = self.event_loop.take() {
            event_loop.stop();
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Builds, starts and runs a VM to its end in this (VMM) process, dropping privileges first.
pub fn run(config: &VmConfig) -> Result<VmExit, VmmError> {
    Ok(build(config)?.start(Privileges::Drop)?.wait())
}

/// Makes every thread allocate from glibc's main arena. A thread-private arena grows with
/// `mprotect` and, on its first shrink, opens `/proc/sys/vm/overcommit_memory`; neither is in
/// the vCPU or device threads' seccomp allowlists, and bulk vsock traffic was seen to SIGSYS the
/// VMM that way. Must run before the VM's threads exist (it only affects arenas made later).
fn single_malloc_arena() {
    // SAFETY: mallopt only changes allocator tuning; M_ARENA_MAX with 1 is a documented,
    // always-valid setting, and no allocation is in flight on another thread at this point
    // (the VM's threads start later), though glibc's own locking would make that safe too.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if ok != 1 {
        tracing::warn!("mallopt(M_ARENA_MAX, 1) failed; seccomp may refuse allocator syscalls");
    }
}
