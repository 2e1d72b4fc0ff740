//! Reaping: every orphan in the guest becomes init's child, and each one that exits stays a
//! zombie until init collects it.
//!
//! Processes the agent spawns itself (through [`crate::children::spawn`]) are collected here
//! too (a `waitpid(-1)` loop takes any child), and their statuses handed to their spawners.

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// What is left after reaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remaining {
    /// Children are still running.
    Some,
    /// No children at all: as PID 1, no process is left.
    None,
}

/// Collects every exited child without blocking. Returns how many were reaped and whether any
/// child remains.
pub fn reap_all() -> (usize, Remaining) {
    // Held so that a child spawned right now is recorded before it can be reaped.
    let mut spawned = crate::children::lock();
    let mut reaped = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return (reaped, Remaining::Some),
            Ok(status) => {
                crate::children::deliver(&mut spawned, status);
                reaped += 1;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return (reaped, Remaining::None),
            Err(e) => {
                crate::say!("waitpid failed: {e}");
                return (reaped, Remaining::Some);
            }
        }
    }
}
