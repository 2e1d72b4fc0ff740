//! Ending the VM cleanly on SIGTERM, SIGINT or SIGHUP, so that a VMM told to stop still joins
//! its threads and removes its files (the vsock socket) instead of dying mid-flight.
//!
//! The signals are blocked in the calling thread before the VM's threads are spawned (they
//! inherit the mask), and one small thread takes them with `sigwait` and asks the VM to stop.

use std::sync::Arc;

use crate::exit::{ExitCoordinator, VmExit};

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in STOP_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks [`STOP_SIGNALS`] in this thread and starts a thread that turns the first one into a
/// [`VmExit::Stopped`] request. Call before the VM's threads are spawned.
pub fn stop_on_signals(exits: Arc<ExitCoordinator>) -> std::io::Result<()> {
    let set = stop_set();
    // SAFETY: `set` is an initialised signal set; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: waits for a signal of the blocked set; `signal` is a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                tracing::info!(signal, "stop signal received");
                exits.request(VmExit::Stopped);
            }
        })?;
    Ok(())
}
