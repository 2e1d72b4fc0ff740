//! Filesystem work done with a user's credentials, so a non-root user only reaches what Unix
//! permissions allow it to, whatever paths or symlinks it names.
//!
//! The closure runs on a blocking-pool thread that first switches *its own* filesystem
//! credentials: `setfsgid`, `setgroups`, `setfsuid` as raw syscalls (the kernel applies them
//! per thread; glibc's `setgroups` wrapper would broadcast to every thread of the process, so
//! it is bypassed). With a non-zero fsuid the kernel drops the thread's filesystem
//! capabilities (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, ...), so every `open`, `mkdir`, `rename`,
//! symlink walk is checked as that user, and new files belong to it. A guard switches back to
//! root before the thread returns to the pool, even if the closure panics. File descriptors
//! opened inside stay valid afterwards (permissions are checked at open).
//!
//! When the agent itself is not root (a developer running `serve` unprivileged) it cannot
//! switch; it then works with its own credentials, and only as its own user.

use std::io;

use super::connect::{Code, ConnectError};
use super::users::Account;

/// Runs `work` with `account`'s filesystem credentials on a blocking thread.
pub async fn run_as<T, F>(account: &Account, work: F) -> Result<T, ConnectError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ConnectError> + Send + 'static,
{
    let account = account.clone();
    tokio::task::spawn_blocking(move || {
        let _guard = Credentials::switch(&account)?;
        work()
    })
    .await
    .map_err(|e| ConnectError::internal(format!("filesystem task failed: {e}")))?
}

/// The switched credentials of the current thread; dropping switches back.
#[derive(Debug)]
struct Credentials {
    /// The thread's own supplementary groups, to restore; `None` when nothing was switched.
    saved_groups: Option<Vec<libc::gid_t>>,
}

impl Credentials {
    fn switch(account: &Account) -> Result<Self, ConnectError> {
        let me = nix::unistd::geteuid();
        if !me.is_root() {
            if me == account.uid {
                return Ok(Self { saved_groups: None });
            }
            return Err(ConnectError::new(
                Code::PermissionDenied,
                format!(
                    "the agent runs as uid {me}, not root, and cannot act as user `{}`",
                    account.name
                ),
            ));
        }
        if account.is_root() {
            return Ok(Self { saved_groups: None });
        }
        let saved: Vec<libc::gid_t> = nix::unistd::getgroups()
            .map_err(|e| ConnectError::internal(format!("getgroups: {e}")))?
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let groups: Vec<libc::gid_t> = account.groups.iter().map(|g| g.as_raw()).collect();
        let guard = Self {
            saved_groups: Some(saved),
        };
        set_fsgid(account.gid.as_raw());
        set_groups(&groups).map_err(|e| ConnectError::internal(format!("setgroups: {e}")))?;
        set_fsuid(account.uid.as_raw());
        Ok(guard)
    }
}

impl Drop for Credentials {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved_groups {
            set_fsuid(0);
            set_fsgid(0);
            if let Err(e) = set_groups(saved) {
                // The thread would keep the user's groups; better to stop than to leak them.
                tracing::error!("cannot restore supplementary groups: {e}");
                std::process::abort();
            }
        }
    }
}

fn set_fsuid(uid: libc::uid_t) {
    // SAFETY: setfsuid takes an integer and changes only this thread's fsuid; it cannot fail
    // in a way that matters here (it returns the previous fsuid).
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) };
}

fn set_fsgid(gid: libc::gid_t) {
    // SAFETY: as for setfsuid: integer argument, per-thread effect.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) };
}

fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t; the raw syscall (unlike
    // glibc's wrapper) changes only the calling thread's supplementary groups.
    let result = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
