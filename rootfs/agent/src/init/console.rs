//! Makes /dev/console the init's stdin, stdout and stderr. The kernel does this itself when
//! /dev/console exists at boot; this covers a root filesystem without the device node.

use std::os::fd::{AsRawFd, IntoRawFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout};

pub fn attach() -> Result<(), Errno> {
    let console = open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // `dup2` clears close-on-exec on the copies, so children inherit the console.
    dup2_stdin(&console)?;
    dup2_stdout(&console)?;
    dup2_stderr(&console)?;
    if console.as_raw_fd() <= 2 {
        // The kernel left fds 0-2 closed and open() reused one of them: it is now one of the
        // standard streams and must stay open.
        let _ = console.into_raw_fd();
    }
    Ok(())
}
