//! Power-off: stop every process (SIGTERM, a bounded wait, SIGKILL), sync, make the root
//! filesystem read-only, then reset the machine. The VMM (and QEMU with `-no-reboot`) treats a
//! guest reset as power-off; the kernel command line picks the reset method (`reboot=t` or
//! `reboot=k`). In a PID namespace, `reboot()` from its init ends the namespace instead.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::InitOptions;
use super::reaper::{Remaining, reap_all};
use crate::say;

/// How long processes get to exit after SIGTERM.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// How long to wait for SIGKILLed processes to be collected.
const KILL_GRACE: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(10);

/// Shuts down. Never returns: if the reset fails, init idles.
pub fn power_off(options: &InitOptions, reason: &str) -> ! {
    let started = Instant::now();
    signal_all(Signal::SIGTERM);
    signal_all(Signal::SIGCONT); // stopped processes must run to handle SIGTERM
    let mut killed = false;
    if !wait_for_no_children(TERM_GRACE) {
        signal_all(Signal::SIGKILL);
        killed = true;
        wait_for_no_children(KILL_GRACE);
    }
    nix::unistd::sync();
    if !options.skip_system_setup {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, "/", None::<&str>, flags, None::<&str>) {
            say!("cannot remount / read-only: {e}");
        }
    }
    say!(
        "powering off ({reason}; processes stopped in {} ms{})",
        started.elapsed().as_millis(),
        if killed { ", some with SIGKILL" } else { "" }
    );
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    say!("reboot failed: {e}; idling");
    loop {
        std::thread::park();
    }
}

/// Signals every process but init itself.
fn signal_all(signal: Signal) {
    match kill(Pid::from_raw(-1), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => say!("kill(-1, {signal}) failed: {e}"),
    }
}

/// Reaps until init has no children left or `timeout` passes; true if none are left.
fn wait_for_no_children(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if reap_all().1 == Remaining::None {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}
