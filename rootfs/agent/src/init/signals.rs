//! The signals init acts on, read synchronously from a signalfd.
//!
//! They are blocked in every thread (block them before starting any thread), which is also
//! what lets PID 1 receive them at all: the kernel drops unhandled default-action signals sent
//! to a namespace's init, but queues blocked ones. Processes init spawns inherit the mask and
//! must reset it before exec.

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// What a received signal asks init to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A child changed state: reap.
    ChildExited,
    /// Stop everything and power off; carries the signal for the log.
    Shutdown(Signal),
    /// Something init does not act on.
    Ignored,
}

/// SIGTERM: `roost-agent poweroff` and the host. SIGINT: Ctrl-Alt-Del. SIGPWR: power failure.
const SHUTDOWN: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGPWR];
const OTHERS: [Signal; 4] = [
    Signal::SIGCHLD,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks init's signals in the calling thread (and threads it starts later) and opens a
    /// signalfd for them.
    pub fn block() -> Result<Self, Errno> {
        let mut mask = SigSet::empty();
        for signal in SHUTDOWN.into_iter().chain(OTHERS) {
            mask.add(signal);
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)?;
        Ok(Self { fd })
    }

    /// Waits for the next signal.
    pub fn next(&mut self) -> Result<Event, Errno> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => {
                    let signal = i32::try_from(info.ssi_signo)
                        .ok()
                        .and_then(|n| Signal::try_from(n).ok());
                    return Ok(match signal {
                        Some(Signal::SIGCHLD) => Event::ChildExited,
                        Some(signal) if SHUTDOWN.contains(&signal) => Event::Shutdown(signal),
                        _ => Event::Ignored,
                    });
                }
                Ok(None) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
