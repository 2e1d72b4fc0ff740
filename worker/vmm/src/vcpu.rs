//! vCPUs: their boot-time register state, and the loop each vCPU thread runs — `KVM_RUN`,
//! dispatch port-I/O and MMIO exits to the buses, and report how the VM ends.
//!
//! Stopping and pausing: a vCPU sits inside `KVM_RUN` even while the guest is halted (the
//! in-kernel irqchip handles HLT), so the VM kicks vCPU threads with [`KICK_SIGNAL`], whose
//! handler does nothing and is installed without `SA_RESTART`: `KVM_RUN` returns `EINTR`, the
//! thread consults [`RunControl`], and parks (pause) or leaves (stop).

use std::sync::{Arc, Condvar, Mutex, Once};

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::arch::{cpuid, lapic, msrs, regs};
use crate::devices::bus::Bus;
use crate::exit::{ExitCoordinator, ShutdownReason, VmExit};

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("could not create vCPU {index}")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("could not set {what} of vCPU {index}")]
    Setup {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {written} of {wanted} boot MSRs of vCPU {index}")]
    PartialMsrs {
        index: u8,
        written: usize,
        wanted: usize,
    },
    #[error("could not build the MSR list")]
    MsrList,
    #[error("could not install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
}

/// The real-time signal that makes `KVM_RUN` return.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Same as [`kick_signal`], for docs.
pub const KICK_SIGNAL: &str = "SIGRTMIN+0";

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op kick handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    static RESULT: Mutex<Option<vmm_sys_util::errno::Error>> = Mutex::new(None);
    INSTALL.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            *RESULT.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
    });
    match *RESULT.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(VcpuError::SignalHandler(e)),
        None => Ok(()),
    }
}

/// What every vCPU thread should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Shared run state of all vCPUs, and how many are parked.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<(RunState, usize)>,
    changed: Condvar,
}

impl Default for RunControl {
    fn default() -> Self {
        Self {
            state: Mutex::new((RunState::Running, 0)),
            changed: Condvar::new(),
        }
    }
}

impl RunControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, (RunState, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU to pause, resume or stop (they notice when kicked).
    pub fn set(&self, state: RunState) {
        self.lock().0 = state;
        self.changed.notify_all();
    }

    pub fn state(&self) -> RunState {
        self.lock().0
    }

    /// vCPUs currently parked by a pause.
    pub fn parked(&self) -> usize {
        self.lock().1
    }

    /// Called by a vCPU thread after `KVM_RUN` was interrupted: parks while paused; returns
    /// whether the thread should keep running.
    fn keep_running(&self) -> bool {
        let mut guard = self.lock();
        if guard.0 == RunState::Paused {
            guard.1 += 1;
            self.changed.notify_all();
            while guard.0 == RunState::Paused {
                guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            guard.1 -= 1;
        }
        guard.0 == RunState::Running
    }
}

/// One vCPU, created and set up to start at the kernel's 64-bit entry point.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and loads its boot state: normalised CPUID, boot MSRs,
    /// registers at `entry`, FPU, and LAPIC LINT0/LINT1.
    pub fn new(
        vm: &VmFd,
        supported_cpuid: &CpuId,
        index: u8,
        count: u8,
        entry: u64,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        let setup = |what| {
            move |source| VcpuError::Setup {
                index,
                what,
                source,
            }
        };

        let mut cpuid = supported_cpuid.clone();
        cpuid::normalise(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid).map_err(setup("CPUID"))?;

        let entries = msrs::boot_msr_entries();
        let msr_list = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList)?;
        let written = fd.set_msrs(&msr_list).map_err(setup("MSRs"))?;
        if written != entries.len() {
            return Err(VcpuError::PartialMsrs {
                index,
                written,
                wanted: entries.len(),
            });
        }

        fd.set_regs(&regs::boot_regs(entry))
            .map_err(setup("registers"))?;
        let sregs = fd.get_sregs().map_err(setup("special registers"))?;
        fd.set_sregs(&regs::boot_sregs(sregs))
            .map_err(setup("special registers"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(setup("FPU"))?;
        let mut apic = fd.get_lapic().map_err(setup("LAPIC"))?;
        lapic::set_boot_lints(&mut apic);
        fd.set_lapic(&apic).map_err(setup("LAPIC"))?;
        Ok(Self { index, fd })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }
}

/// Everything a vCPU thread shares with the rest of the VM.
#[derive(Debug, Clone)]
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exits: Arc<ExitCoordinator>,
    pub control: Arc<RunControl>,
}

/// Guest-triggerable log lines are rate-limited to this many per vCPU.
const MAX_UNHANDLED_LOGS: u32 = 16;

/// Runs the vCPU until the VM ends or the thread is told to stop.
pub fn run(mut vcpu: Vcpu, shared: &VcpuShared) {
    let index = vcpu.index;
    let mut unhandled_logged = 0u32;
    let mut unhandled = |kind: &str, addr: u64| {
        if unhandled_logged < MAX_UNHANDLED_LOGS {
            unhandled_logged += 1;
            tracing::debug!(
                vcpu = index,
                kind,
                addr = format_args!("{addr:#x}"),
                "no device"
            );
        }
    };
    loop {
        if shared.control.state() != RunState::Running && !shared.control.keep_running() {
            return;
        }
        let outcome = match vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !shared.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                    unhandled("port read", u64::from(port));
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !shared.pio.write(u64::from(port), data) {
                    unhandled("port write", u64::from(port));
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !shared.mmio.read(addr, data) {
                    data.fill(0xff);
                    unhandled("mmio read", addr);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !shared.mmio.write(addr, data) {
                    unhandled("mmio write", addr);
                }
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VmExit::Shutdown(ShutdownReason::TripleFault)),
            Ok(VcpuExit::Hlt) => Some(VmExit::Shutdown(ShutdownReason::Halt)),
            Ok(VcpuExit::SystemEvent(kind, data)) => Some(system_event(index, kind, data)),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Error {
                detail: format!(
                    "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
                ),
            }),
            Ok(VcpuExit::InternalError) => Some(VmExit::Error {
                detail: format!(
                    "vCPU {index}: KVM internal error (an instruction KVM cannot emulate){}",
                    describe_regs(&vcpu.fd)
                ),
            }),
            Ok(other) => Some(VmExit::Error {
                detail: format!("vCPU {index}: unexpected VM exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VmExit::Error {
                detail: format!("vCPU {index}: KVM_RUN failed: {e}"),
            }),
        };
        if let Some(exit) = outcome {
            shared.exits.request(exit);
            return;
        }
    }
}

fn system_event(index: u8, kind: u32, data: &[u64]) -> VmExit {
    match kind {
        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown(ShutdownReason::PowerOff),
        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Shutdown(ShutdownReason::Reset),
        _ => VmExit::Error {
            detail: format!("vCPU {index}: system event {kind} (data {data:x?})"),
        },
    }
}

fn describe_regs(fd: &VcpuFd) -> String {
    match fd.get_regs() {
        Ok(r) => format!(" at rip {:#x}", r.rip),
        Err(_) => String::new(),
    }
}
