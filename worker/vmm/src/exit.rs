//! How a VM ended, and the one place every thread reports it.
//!
//! Any thread may end the VM: a vCPU (triple fault, KVM system event, unexpected exit), the
//! i8042 (reset command), the serial console (a kernel panic line), the device loop (an
//! error). The first report wins; the thread running the VM waits here, then stops the rest.
//! A panic line is remembered rather than ending the VM at once, so the panic trace that
//! follows still reaches the log; the VM ends when the guest reboots itself (`panic=-1`) or
//! after a grace period, and is reported as a panic either way.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a panicking guest may keep printing before the VMM stops it.
pub const PANIC_GRACE: Duration = Duration::from_secs(2);

/// Why a guest ended cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownReason {
    /// A triple fault (`KVM_EXIT_SHUTDOWN`): what `reboot=t` does on reboot or power-off.
    TripleFault,
    /// The guest wrote the reset command (0xFE) to the i8042.
    KeyboardReset,
    /// KVM reported a power-off system event.
    PowerOff,
    /// KVM reported a reset system event.
    Reset,
    /// A halted vCPU left KVM (only without an in-kernel irqchip).
    Halt,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmExit {
    /// The guest shut itself down.
    Shutdown(ShutdownReason),
    /// The guest kernel panicked; `line` is its "Kernel panic - not syncing: ..." line.
    Panic { line: String },
    /// The VMM or KVM failed, or the guest did something the VMM does not handle.
    Error { detail: String },
    /// The host asked the VM to stop.
    Stopped,
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Shutdown(reason) => write!(f, "guest shut down ({reason:?})"),
            VmExit::Panic { line } => write!(f, "guest kernel panic: {line}"),
            VmExit::Error { detail } => write!(f, "VM failed: {detail}"),
            VmExit::Stopped => write!(f, "VM stopped by the host"),
        }
    }
}

#[derive(Debug, Default)]
struct Reports {
    exit: Option<VmExit>,
    panic: Option<(String, Instant)>,
}

/// Collects exit reports from every thread; see the module docs.
#[derive(Debug, Default)]
pub struct ExitCoordinator {
    reports: Mutex<Reports>,
    changed: Condvar,
}

impl ExitCoordinator {
    pub fn new() -> Self {
        Self::default()
    }

    fn reports(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the VM with `exit` unless something else already did.
    pub fn request(&self, exit: VmExit) {
        let mut reports = self.reports();
        if reports.exit.is_none() {
            tracing::debug!(%exit, "VM exit requested");
            reports.exit = Some(exit);
            self.changed.notify_all();
        }
    }

    /// Records the guest's panic line (the first one counts).
    pub fn note_panic(&self, line: String) {
        let mut reports = self.reports();
        if reports.panic.is_none() {
            reports.panic = Some((line, Instant::now()));
            self.changed.notify_all();
        }
    }

    /// Whether an exit has been decided (threads poll this to stop).
    pub fn has_exit(&self) -> bool {
        self.reports().exit.is_some()
    }

    /// Blocks until the VM has ended and says how; a recorded panic wins over the shutdown or
    /// error it causes.
    pub fn wait(&self) -> VmExit {
        self.wait_with_grace(PANIC_GRACE)
    }

    fn wait_with_grace(&self, grace: Duration) -> VmExit {
        let mut reports = self.reports();
        loop {
            if let Some((line, _)) = &reports.panic
                && reports.exit.is_some()
            {
                return VmExit::Panic { line: line.clone() };
            }
            if let Some(exit) = &reports.exit {
                return exit.clone();
            }
            reports = match &reports.panic {
                Some((line, since)) => {
                    let left = grace.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        let line = line.clone();
                        reports.exit = Some(VmExit::Panic { line: line.clone() });
                        return VmExit::Panic { line };
                    }
                    self.changed
                        .wait_timeout(reports, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self
                    .changed
                    .wait(reports)
                    .unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// Held by each VM thread: if the thread unwinds from a panic, the VM ends with an error
/// instead of waiting forever for a report that will never come.
#[derive(Debug)]
pub struct PanicGuard {
    exits: std::sync::Arc<ExitCoordinator>,
    thread: String,
}

impl PanicGuard {
    pub fn new(exits: std::sync::Arc<ExitCoordinator>, thread: impl Into<String>) -> Self {
        Self {
            exits,
            thread: thread.into(),
        }
    }
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.exits.request(VmExit::Error {
                detail: format!("the {} thread panicked", self.thread),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_panicking_thread_ends_the_vm_with_an_error() {
        let c = Arc::new(ExitCoordinator::new());
        let guarded = c.clone();
        let result = std::thread::spawn(move || {
            let _guard = PanicGuard::new(guarded, "vcpu0");
            panic!("bug");
        })
        .join();
        assert!(result.is_err());
        assert_eq!(
            c.wait(),
            VmExit::Error {
                detail: "the vcpu0 thread panicked".into()
            }
        );
        let quiet = Arc::new(ExitCoordinator::new());
        drop(PanicGuard::new(quiet.clone(), "devices"));
        assert!(!quiet.has_exit(), "a normal return reports nothing");
    }

    #[test]
    fn the_first_exit_wins() {
        let c = ExitCoordinator::new();
        c.request(VmExit::Shutdown(ShutdownReason::TripleFault));
        c.request(VmExit::Error {
            detail: "late".into(),
        });
        assert_eq!(c.wait(), VmExit::Shutdown(ShutdownReason::TripleFault));
    }

    #[test]
    fn a_panic_line_turns_the_following_reboot_into_a_panic_exit() {
        let c = Arc::new(ExitCoordinator::new());
        let reporter = c.clone();
        let t = std::thread::spawn(move || {
            reporter.note_panic("Kernel panic - not syncing: VFS".into());
            std::thread::sleep(Duration::from_millis(20));
            reporter.request(VmExit::Shutdown(ShutdownReason::TripleFault));
        });
        let exit = c.wait_with_grace(Duration::from_secs(30));
        t.join().unwrap();
        assert_eq!(
            exit,
            VmExit::Panic {
                line: "Kernel panic - not syncing: VFS".into()
            }
        );
    }

    #[test]
    fn a_panicking_guest_that_never_reboots_is_stopped_after_the_grace_period() {
        let c = ExitCoordinator::new();
        c.note_panic("Kernel panic - not syncing: x".into());
        let started = Instant::now();
        let exit = c.wait_with_grace(Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(matches!(exit, VmExit::Panic { .. }));
        assert!(c.has_exit());
    }
}
