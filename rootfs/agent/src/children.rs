//! Exit statuses of the processes the agent spawns itself, delivered to whoever spawned them.
//!
//! As PID 1, init's reaper (`init/reaper.rs`) collects *every* exited child with
//! `waitpid(-1)`, so a spawner that called `waitpid(pid)` itself would race it and usually get
//! `ECHILD`. Instead, spawners go through [`spawn`], which records the child's pid, and the
//! reaper hands each status it collects to [`deliver`]. Both hold one lock ([`lock`]) around
//! fork-and-record and around each reaping pass, so a child that exits before its pid is
//! recorded cannot be reaped unseen.
//!
//! Outside PID 1 (tests, `roost-agent serve`) nobody reaps with `waitpid(-1)`: call
//! [`reap_registered`] on SIGCHLD; it waits only for recorded pids and leaves other children
//! of the process (e.g. ones a library waits for itself) alone.
//!
//! Never call `wait` on the returned [`std::process::Child`]; await the [`Exit`] instead.
//!
//! [`spawn`] also clears the child's signal mask: init blocks its signals for a signalfd in
//! every thread, and `std::process::Command` passes the mask on to the program it runs (checked:
//! it does not reset it), which would leave commands deaf to SIGINT and SIGTERM.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, OnceLock};

use std::os::unix::process::CommandExt;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a spawned child ended.
pub type Exit = oneshot::Receiver<WaitStatus>;

type Waiters = HashMap<i32, oneshot::Sender<WaitStatus>>;

fn waiters() -> &'static Mutex<Waiters> {
    static WAITERS: OnceLock<Mutex<Waiters>> = OnceLock::new();
    WAITERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The registry lock: hold it while reaping with `waitpid(-1)`.
pub fn lock() -> MutexGuard<'static, Waiters> {
    // A panic while holding the lock leaves the map consistent (inserts and removes only).
    waiters()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Spawns `command` and records its pid; the returned [`Exit`] resolves when it is reaped.
pub fn spawn(command: &mut Command) -> std::io::Result<(Child, Exit)> {
    // SAFETY: the closure runs between fork and exec and only calls sigprocmask, which is
    // async-signal-safe, on a stack-allocated empty set.
    unsafe {
        command.pre_exec(|| {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)
        });
    }
    let mut guard = lock();
    let child = command.spawn()?;
    let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
    let (sender, receiver) = oneshot::channel();
    guard.insert(pid, sender);
    Ok((child, receiver))
}

/// Hands a status collected by a `waitpid(-1)` reaper to the child's spawner, if any. Call it
/// with the guard from [`lock`] held across the `waitpid` call.
pub fn deliver(guard: &mut Waiters, status: WaitStatus) {
    let Some(pid) = status.pid() else { return };
    if let Some(sender) = guard.remove(&pid.as_raw()) {
        // The spawner may have stopped waiting; then nobody wants the status.
        let _ = sender.send(status);
    }
}

/// Reaps the recorded children that have exited (outside PID 1). Returns how many.
pub fn reap_registered() -> usize {
    let mut guard = lock();
    let pids: Vec<i32> = guard.keys().copied().collect();
    let mut reaped = 0;
    for pid in pids {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
            Ok(status) => {
                reaped += 1;
                deliver(&mut guard, status);
            }
            Err(_) => {
                // ECHILD: someone else reaped it; the spawner learns it never will be told.
                guard.remove(&pid);
            }
        }
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reaches_the_spawner_and_other_children_are_left_alone() {
        let (_child, mut exit) = spawn(Command::new("sh").args(["-c", "exit 7"])).unwrap();
        // A child the registry does not know about: reap_registered must not collect it.
        let mut foreign = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            reap_registered();
            if let Ok(status) = exit.try_recv() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "child never reaped");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(matches!(status, WaitStatus::Exited(_, 7)), "{status:?}");
        assert_eq!(foreign.wait().unwrap().code(), Some(3));
    }

    #[test]
    fn children_start_with_no_blocked_signals_even_when_the_spawner_blocks_some() {
        // A fresh thread, so blocking SIGUSR1 here leaves the other tests' threads alone.
        std::thread::spawn(|| {
            let mut blocked = SigSet::empty();
            blocked.add(nix::sys::signal::Signal::SIGUSR1);
            sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).unwrap();
            let (_child, mut exit) = spawn(
                Command::new("sh")
                    .args(["-c", "grep -q '^SigBlk:[[:space:]]*0*$' /proc/self/status"]),
            )
            .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let status = loop {
                reap_registered();
                if let Ok(status) = exit.try_recv() {
                    break status;
                }
                assert!(std::time::Instant::now() < deadline, "child never reaped");
                std::thread::sleep(std::time::Duration::from_millis(10));
            };
            assert!(
                matches!(status, WaitStatus::Exited(_, 0)),
                "the child inherited blocked signals: {status:?}"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn deliver_ignores_unknown_pids() {
        let mut guard = lock();
        deliver(&mut guard, WaitStatus::Exited(Pid::from_raw(i32::MAX), 0));
        deliver(&mut guard, WaitStatus::StillAlive);
    }
}
