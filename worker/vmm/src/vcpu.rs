//! vCPUs: their boot-time register state, and the loop each vCPU thread runs — `KVM_RUN`,
//! dispatch port-I/O and MMIO exits to the buses, and report how the VM ends.
//!
//! Stopping and pausing: a vCPU sits inside `KVM_RUN` even while the guest is halted (the
//! in-kernel irqchip handles HLT), so the VM kicks vCPU threads with [`kick_signal`] (SIGRTMIN), whose
//! handler does nothing and is installed without `SA_RESTART`: `KVM_RUN` returns `EINTR`, the
//! thread consults [`RunControl`], and parks (pause) or leaves (stop).
//!
//! Before parking, a thread whose last exit was a port-I/O or MMIO exit re-enters `KVM_RUN`
//! once with `immediate_exit` set: KVM then completes the instruction (e.g. stores an `in`
//! result in RAX, advances RIP) and returns `EINTR` without running guest code. Without that,
//! saved registers would point at the `out` instruction and a restored guest would execute it
//! twice (a duplicated console byte was seen, VMM-NOTES).

use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::arch::{cpuid, lapic, msrs, regs};
use crate::devices::bus::Bus;
use crate::exit::{ExitCoordinator, ShutdownReason, VmExit};
use crate::state::{RestoreError, StateError, VcpuState};

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
    #[error("could not restore the state of vCPU {index}")]
    Restore {
        index: u8,
        #[source]
        source: RestoreError,
    },
}

/// The real-time signal that makes `KVM_RUN` return.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

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

/// What the vCPU threads share about running, pausing and saving.
#[derive(Debug)]
struct Control {
    state: RunState,
    parked: usize,
    /// Incremented for each save request; `served[i]` is the last round vCPU `i` answered.
    save_round: u64,
    served: Vec<u64>,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// Shared run state of all vCPUs: pause, resume, stop, and saving state while paused.
#[derive(Debug)]
pub struct RunControl {
    control: Mutex<Control>,
    changed: Condvar,
}

impl RunControl {
    /// Control for `vcpus` vCPUs, running.
    pub fn new(vcpus: usize) -> Self {
        Self {
            control: Mutex::new(Control {
                state: RunState::Running,
                parked: 0,
                save_round: 0,
                served: vec![0; vcpus],
                saved: vec![None; vcpus],
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU to pause, resume or stop (they notice when kicked).
    pub fn set(&self, state: RunState) {
        self.lock().state = state;
        self.changed.notify_all();
    }

    pub fn state(&self) -> RunState {
        self.lock().state
    }

    /// vCPUs currently parked by a pause.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Asks every parked vCPU for its state; returns once all `count` answered or `timeout`
    /// passed.
    pub fn collect_states(&self, timeout: Duration) -> Result<Vec<VcpuState>, StateError> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock();
        guard.save_round += 1;
        guard.saved.iter_mut().for_each(|s| *s = None);
        self.changed.notify_all();
        while guard.saved.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StateError::PauseTimeout(timeout));
            }
            guard = self
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut states = Vec::with_capacity(guard.saved.len());
        for (index, saved) in (0u8..).zip(guard.saved.iter_mut()) {
            match saved.take() {
                Some(Ok(state)) => states.push(state),
                Some(Err(detail)) => return Err(StateError::Vcpu { index, detail }),
                None => unreachable!("checked above"),
            }
        }
        Ok(states)
    }

    /// Called by vCPU thread `index` after `KVM_RUN` was interrupted: parks while paused
    /// (answering save requests with `save`); returns whether the thread should keep running.
    fn keep_running(
        &self,
        index: usize,
        save: &mut dyn FnMut() -> Result<VcpuState, String>,
    ) -> bool {
        let mut guard = self.lock();
        if guard.state == RunState::Paused {
            guard.parked += 1;
            self.changed.notify_all();
            while guard.state == RunState::Paused {
                if guard
                    .served
                    .get(index)
                    .is_some_and(|s| *s < guard.save_round)
                {
                    let round = guard.save_round;
                    guard.served[index] = round;
                    guard.saved[index] = Some(save());
                    self.changed.notify_all();
                    continue;
                }
                guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            guard.parked -= 1;
        }
        guard.state == RunState::Running
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

    /// Creates vCPU `state.index` and loads its saved state (see `state` for the order).
    pub fn restore(vm: &VmFd, state: &VcpuState, tsc_scaling: bool) -> Result<Self, VcpuError> {
        let index = state.index;
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        state
            .restore(&fd, tsc_scaling)
            .map_err(|source| VcpuError::Restore { index, source })?;
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
    /// KVM's MSR index list, for saving state.
    pub msr_indices: Arc<Vec<u32>>,
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
    // Whether the last exit was port I/O or MMIO, which KVM completes on the next KVM_RUN.
    let mut io_pending = false;
    loop {
        if shared.control.state() != RunState::Running {
            if io_pending && let Some(exit) = complete_pending_io(&mut vcpu, shared) {
                shared.exits.request(exit);
                return;
            }
            let fd = &vcpu.fd;
            let mut save =
                || VcpuState::save(fd, index, &shared.msr_indices).map_err(|e| e.to_string());
            if !shared.control.keep_running(usize::from(index), &mut save) {
                return;
            }
        }
        io_pending = true;
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
                io_pending = false;
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

/// Most I/O exits one completion may chain (a split MMIO access exits once per fragment).
const MAX_COMPLETION_EXITS: usize = 8;

/// Re-enters `KVM_RUN` with `immediate_exit` set so KVM finishes the in-flight I/O instruction
/// without running guest code (see the module docs). Exits that still come out (fragments of
/// one MMIO access) are served; anything else ends the VM.
fn complete_pending_io(vcpu: &mut Vcpu, shared: &VcpuShared) -> Option<VmExit> {
    let index = vcpu.index;
    vcpu.fd.set_kvm_immediate_exit(1);
    let mut outcome = None;
    for _ in 0..MAX_COMPLETION_EXITS {
        match vcpu.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
            Ok(VcpuExit::IoIn(port, data)) => {
                if !shared.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !shared.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio.write(addr, data);
            }
            Ok(other) => {
                outcome = Some(VmExit::Error {
                    detail: format!("vCPU {index}: exit {other:?} while completing I/O to pause"),
                });
                break;
            }
            Err(e) => {
                outcome = Some(VmExit::Error {
                    detail: format!("vCPU {index}: KVM_RUN failed while completing I/O: {e}"),
                });
                break;
            }
        }
    }
    vcpu.fd.set_kvm_immediate_exit(0);
    outcome
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(index: u8) -> VcpuState {
        VcpuState {
            index,
            cpuid: Vec::new(),
            msrs: Vec::new(),
            regs: kvm_bindings::kvm_regs {
                rip: 0x1000 + u64::from(index),
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Vec::new(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            vcpu_events: Default::default(),
            tsc_khz: None,
        }
    }

    /// Stands in for a vCPU thread: parks through `keep_running` until told to stop.
    fn fake_vcpu(control: Arc<RunControl>, index: u8) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut saves = 0;
            let mut save = || {
                saves += 1;
                Ok(state_of(index))
            };
            while control.keep_running(usize::from(index), &mut save) {
                std::thread::sleep(Duration::from_millis(1));
            }
            saves
        })
    }

    #[test]
    fn paused_vcpus_report_their_state_and_stop_on_request() {
        let control = Arc::new(RunControl::new(2));
        control.set(RunState::Paused);
        let threads = [fake_vcpu(control.clone(), 0), fake_vcpu(control.clone(), 1)];
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.parked() < 2 {
            assert!(Instant::now() < deadline, "vCPUs never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        let states = control.collect_states(Duration::from_secs(10)).unwrap();
        assert_eq!(
            states.iter().map(|s| s.regs.rip).collect::<Vec<_>>(),
            [0x1000, 0x1001]
        );
        let again = control.collect_states(Duration::from_secs(10)).unwrap();
        assert_eq!(again.len(), 2);
        control.set(RunState::Stopping);
        for t in threads {
            assert_eq!(t.join().unwrap(), 2, "one save per request");
        }
        assert_eq!(control.parked(), 0);
    }

    #[test]
    fn collecting_without_paused_vcpus_times_out() {
        let control = RunControl::new(1);
        let err = control
            .collect_states(Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(err, StateError::PauseTimeout(_)));
    }
}
