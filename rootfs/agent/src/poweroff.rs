//! `roost-agent poweroff`: asks PID 1 to shut the guest down by sending it SIGTERM.

use std::io;
use std::os::unix::fs::MetadataExt;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum PoweroffError {
    #[error("cannot tell which program PID 1 is (run as root, e.g. `sudo roost-agent poweroff`)")]
    InspectPid1(#[source] io::Error),
    #[error("PID 1 is not roost-agent; refusing to signal it (is this really a Roost guest?)")]
    NotRoostAgent,
    #[error("cannot signal PID 1 (run as root, e.g. `sudo roost-agent poweroff`)")]
    Signal(#[source] Errno),
}

/// Sends SIGTERM to PID 1 after checking that PID 1 runs this same binary, so running the
/// command on an ordinary machine does not stop its init.
pub fn request() -> Result<(), PoweroffError> {
    let pid1 = std::fs::metadata("/proc/1/exe").map_err(PoweroffError::InspectPid1)?;
    let me = std::fs::metadata("/proc/self/exe").map_err(PoweroffError::InspectPid1)?;
    if (pid1.dev(), pid1.ino()) != (me.dev(), me.ino()) {
        return Err(PoweroffError::NotRoostAgent);
    }
    kill(Pid::from_raw(1), Signal::SIGTERM).map_err(PoweroffError::Signal)
}
