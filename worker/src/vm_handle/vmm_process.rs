//! The VMM child process and the one thread that waits for it.
//!
//! The waiter thread spawns the child itself, so the child's parent-death signal (SIGKILL,
//! set before exec) fires exactly when the thread that owns it goes away — which is only after
//! the child has been reaped, or when the whole worker dies. It waits with `WNOWAIT` first and
//! marks the process exited under a lock before reaping it, so [`VmmProcess::signal`] (which
//! signals under the same lock) can never hit a recycled pid. On exit it removes the VM's
//! socket files (a VMM killed with SIGKILL cannot) and publishes the exit on a watch channel.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag};
use nix::unistd::Pid;
use tokio::sync::watch;

use super::runtime_dir::remove_sockets_in;

/// How the VMM process ended (`roost vm run`'s exit statuses, worker/vmm/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    /// Exit 0: the guest shut down (power-off, reboot).
    GuestShutdown,
    /// Exit 1: the VM could not start.
    StartFailed,
    /// Exit 2: the VMM refused its command line.
    Usage,
    /// Exit 3: the guest kernel panicked.
    GuestPanic,
    /// Exit 4: the VM failed while running.
    VmFailed,
    /// Exit 5: stopped by SIGTERM/SIGINT/SIGHUP.
    Stopped,
    /// Any other exit code.
    Code(i32),
    /// Killed by a signal (SIGKILL from the handle, or from outside).
    Signal(i32),
}

impl VmmExit {
    fn from_status(status: std::process::ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(0), _) => Self::GuestShutdown,
            (Some(1), _) => Self::StartFailed,
            (Some(2), _) => Self::Usage,
            (Some(3), _) => Self::GuestPanic,
            (Some(4), _) => Self::VmFailed,
            (Some(5), _) => Self::Stopped,
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(signal),
            (None, None) => Self::Code(-1),
        }
    }

    /// True when the guest shut itself down cleanly.
    pub fn is_clean(self) -> bool {
        self == Self::GuestShutdown
    }
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestShutdown => write!(f, "the guest shut down (VMM exit 0)"),
            Self::StartFailed => write!(f, "the VM could not start (VMM exit 1)"),
            Self::Usage => write!(f, "the VMM refused its arguments (VMM exit 2)"),
            Self::GuestPanic => write!(f, "the guest kernel panicked (VMM exit 3)"),
            Self::VmFailed => write!(f, "the VM failed while running (VMM exit 4)"),
            Self::Stopped => write!(f, "the VMM was stopped by a signal (VMM exit 5)"),
            Self::Code(code) => write!(f, "the VMM exited with status {code}"),
            Self::Signal(signal) => {
                let name = Signal::try_from(*signal).map_or("unknown signal", Signal::as_str);
                write!(f, "the VMM was killed by signal {signal} ({name})")
            }
        }
    }
}

/// A running (or exited, not yet joined) VMM process.
#[derive(Debug)]
pub struct VmmProcess {
    pid: Pid,
    /// True once the process is a zombie about to be reaped: no more signals.
    exited: Arc<Mutex<bool>>,
    exit: watch::Receiver<Option<VmmExit>>,
    waiter: Option<JoinHandle<()>>,
}

impl VmmProcess {
    /// Spawns `command` (stdio already set up by the caller) on a new waiter thread; on exit
    /// the sockets directly inside `socket_dir` are removed.
    pub fn spawn(mut command: Command, socket_dir: PathBuf) -> std::io::Result<Self> {
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let (exit_tx, exit) = watch::channel(None);
        let exited = Arc::new(Mutex::new(false));
        let (spawned_tx, spawned_rx) = std::sync::mpsc::sync_channel(1);
        let waiter_exited = Arc::clone(&exited);
        let waiter = std::thread::Builder::new()
            .name("vmm-waiter".into())
            .spawn(move || {
                let mut child = match command.spawn() {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
                let _ = spawned_tx.send(Ok(pid));
                wait_without_reaping(pid);
                let status = {
                    let mut exited = waiter_exited.lock().unwrap_or_else(PoisonError::into_inner);
                    *exited = true;
                    child.wait()
                };
                let exit = match status {
                    Ok(status) => VmmExit::from_status(status),
                    Err(e) => {
                        tracing::warn!("reaping the VMM failed: {e}");
                        VmmExit::Code(-1)
                    }
                };
                remove_sockets_in(&socket_dir);
                tracing::debug!(%exit, "VMM exited");
                let _ = exit_tx.send(Some(exit));
            })?;
        match spawned_rx.recv() {
            Ok(Ok(pid)) => Ok(Self {
                pid,
                exited,
                exit,
                waiter: Some(waiter),
            }),
            Ok(Err(e)) => {
                let _ = waiter.join();
                Err(e)
            }
            Err(_) => {
                let _ = waiter.join();
                Err(std::io::Error::other("the VMM waiter thread died"))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// The exit, if the VMM has exited.
    pub fn try_exit(&self) -> Option<VmmExit> {
        *self.exit.borrow()
    }

    /// Waits until the VMM exits.
    pub async fn exited(&self) -> VmmExit {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(value) => value.unwrap_or(VmmExit::Code(-1)),
            // The sender is gone only after it sent the exit.
            Err(_) => self.try_exit().unwrap_or(VmmExit::Code(-1)),
        }
    }

    /// Waits up to `timeout` for the exit.
    pub async fn exited_within(&self, timeout: Duration) -> Option<VmmExit> {
        tokio::time::timeout(timeout, self.exited()).await.ok()
    }

    /// Sends `signal` unless the process has already exited. True when sent.
    pub fn signal(&self, signal: Signal) -> bool {
        let exited = self.exited.lock().unwrap_or_else(PoisonError::into_inner);
        !*exited && nix::sys::signal::kill(self.pid, signal).is_ok()
    }

    /// SIGKILLs the VMM (if still running) and waits for the waiter thread, so that the
    /// process is reaped and its sockets are gone when this returns. Blocks for as long as the
    /// kernel takes to tear the process down (milliseconds).
    pub fn kill_and_reap(&mut self) -> Option<VmmExit> {
        self.signal(Signal::SIGKILL);
        if let Some(waiter) = self.waiter.take()
            && waiter.join().is_err()
        {
            tracing::warn!("the VMM waiter thread panicked");
        }
        self.try_exit()
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Blocks until `pid` has exited, leaving it a zombie (retries on EINTR).
fn wait_without_reaping(pid: Pid) {
    loop {
        match nix::sys::wait::waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!("waiting for the VMM failed: {e}");
                return;
            }
            Ok(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", script]).stdin(Stdio::null());
        command
    }

    #[tokio::test]
    async fn exit_codes_map_to_vmm_exits() {
        let dir = tempfile::tempdir().unwrap();
        for (code, expected) in [
            (0, VmmExit::GuestShutdown),
            (3, VmmExit::GuestPanic),
            (5, VmmExit::Stopped),
            (9, VmmExit::Code(9)),
        ] {
            let vmm = VmmProcess::spawn(sh(&format!("exit {code}")), dir.path().into()).unwrap();
            assert_eq!(vmm.exited().await, expected);
            assert!(!vmm.signal(Signal::SIGTERM), "no signal after the exit");
        }
    }

    #[tokio::test]
    async fn kill_and_reap_reports_the_signal_and_removes_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut vmm = VmmProcess::spawn(sh("sleep 600"), dir.path().into()).unwrap();
        let pid = vmm.pid();
        assert_eq!(vmm.try_exit(), None);
        assert_eq!(vmm.kill_and_reap(), Some(VmmExit::Signal(9)));
        assert!(!socket.exists(), "socket removed");
        let alive = nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), None);
        assert_eq!(alive, Err(nix::errno::Errno::ESRCH), "reaped, not a zombie");
        assert!(
            VmmExit::Signal(9).to_string().contains("SIGKILL"),
            "{}",
            VmmExit::Signal(9)
        );
    }

    #[tokio::test]
    async fn an_external_kill_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = VmmProcess::spawn(sh("sleep 600"), dir.path().into()).unwrap();
        let pid = Pid::from_raw(i32::try_from(vmm.pid()).unwrap());
        nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
        let exit = vmm.exited_within(Duration::from_secs(10)).await;
        assert_eq!(exit, Some(VmmExit::Signal(9)));
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let error =
            VmmProcess::spawn(Command::new("/nonexistent/roost"), dir.path().into()).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    }
}
