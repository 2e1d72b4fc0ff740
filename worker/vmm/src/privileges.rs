//! Dropping privileges once everything privileged is open (/dev/kvm, images, the log, sockets):
//! all capabilities go — effective, permitted, inheritable, ambient and, when allowed, the
//! bounding set — and `no_new_privs` is set so nothing exec'd later can regain any and so
//! unprivileged threads may install seccomp filters.
//!
//! Capabilities are per thread in Linux: call this on the thread that later spawns the vCPU and
//! device threads, before spawning them, so they start without any.

use caps::{CapSet, Capability};

/// Why privileges could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("could not clear the {0:?} capability set")]
    Clear(CapSet, #[source] caps::errors::CapsError),
    #[error("could not read the {0:?} capability set")]
    Read(CapSet, #[source] caps::errors::CapsError),
    #[error("capabilities {0:?} are still effective after dropping them all")]
    StillHeld(Vec<Capability>),
    #[error("could not set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
}

/// Drops every capability this thread holds and sets `no_new_privs`.
pub fn drop_all() -> Result<(), PrivilegeError> {
    // The bounding set can only shrink while CAP_SETPCAP is effective: do it first, and only
    // if we may (an unprivileged process has nothing to drop there that it could use).
    let can_setpcap = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(|e| PrivilegeError::Read(CapSet::Effective, e))?;
    if can_setpcap {
        caps::clear(None, CapSet::Bounding)
            .map_err(|e| PrivilegeError::Clear(CapSet::Bounding, e))?;
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| PrivilegeError::Clear(set, e))?;
    }
    let left = caps::read(None, CapSet::Effective)
        .map_err(|e| PrivilegeError::Read(CapSet::Effective, e))?;
    if !left.is_empty() {
        return Err(PrivilegeError::StillHeld(left.into_iter().collect()));
    }
    set_no_new_privs()
}

/// Sets `PR_SET_NO_NEW_PRIVS` on this thread (inherited by threads it creates).
pub fn set_no_new_privs() -> Result<(), PrivilegeError> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integer arguments and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(PrivilegeError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether `no_new_privs` is set on this thread.
pub fn no_new_privs() -> bool {
    // SAFETY: PR_GET_NO_NEW_PRIVS only returns an integer.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs on its own thread: capabilities and no_new_privs are per thread, so the test
    /// harness's other threads keep theirs.
    #[test]
    fn a_thread_ends_up_with_no_capabilities_and_no_new_privs() {
        std::thread::spawn(|| {
            drop_all().unwrap();
            assert!(caps::read(None, CapSet::Effective).unwrap().is_empty());
            assert!(caps::read(None, CapSet::Permitted).unwrap().is_empty());
            assert!(no_new_privs());
        })
        .join()
        .unwrap();
    }
}
