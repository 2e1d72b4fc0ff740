//! roost-agent as PID 1: set the guest up, announce readiness, then supervise.
//!
//! Order matters: signals are blocked first (before any thread exists), then the pseudo
//! filesystems are mounted, the console attached and the hostname set, and only then is the
//! ready line printed. The supervision loop reaps orphans and powers off on request. Later the
//! agent's servers run beside this loop; the loop itself stays on the main thread.

mod cmdline;
mod console;
pub(crate) mod hostname;
mod mounts;
mod network;
mod reaper;
mod shutdown;
mod signals;

use std::time::Duration;

use crate::say;
use cmdline::KernelCmdline;
use signals::{Event, Signals};

/// The prefix of the one line init prints when the guest is ready. Tests and benchmarks wait
/// for it: `roost-agent: ready hostname=NAME uptime=SECONDSs version=X.Y.Z`.
pub const READY_PREFIX: &str = "roost-agent: ready";

/// Kernel command-line flag: power off right after the ready line, through the same SIGTERM
/// path as `roost-agent poweroff` (boot tests and benchmarks use it to end the VM cleanly).
pub const POWEROFF_AFTER_READY: &str = "roost.poweroff_after_ready";

/// How init behaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitOptions {
    /// Skip mounts, console, hostname and remounting `/` read-only: for tests that run the
    /// agent as PID 1 of a PID namespace on a developer machine.
    pub skip_system_setup: bool,
    /// Where to serve the worker's channel (vsock in a VM); `None` runs no channel.
    pub channel: Option<crate::channel::Endpoints>,
}

/// Runs init. Never returns: PID 1 exiting panics the kernel.
pub fn run(options: &InitOptions) -> ! {
    let mut signals = match Signals::block() {
        Ok(signals) => signals,
        Err(e) => {
            say!("cannot set up signal handling: {e}; powering off");
            shutdown::power_off(options, "no signal handling")
        }
    };
    let (hostname, cmdline) = set_up(options);
    if let Some(endpoints) = &options.channel {
        crate::channel::spawn(endpoints.clone());
    }
    if !options.skip_system_setup
        && let Err(e) = crate::interpreter::guest::start_if_code_interpreter_image()
    {
        say!("cannot start the code interpreter: {e}");
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(envd) = crate::envd::options::for_pid1(&args, options.skip_system_setup)
        && let Err(e) = crate::envd::start_in_background(envd)
    {
        say!("cannot start the envd API: {e:#}");
    }
    let uptime =
        read_uptime().map_or_else(|| "?".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()));
    println!(
        "{READY_PREFIX} hostname={hostname} uptime={uptime} version={}",
        env!("CARGO_PKG_VERSION")
    );
    if cmdline.has(POWEROFF_AFTER_READY) {
        // Blocked, so it is queued for the loop below like any other SIGTERM.
        if let Err(e) = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM) {
            say!("cannot honour {POWEROFF_AFTER_READY}: {e}");
        }
    }
    loop {
        match signals.next() {
            Ok(Event::ChildExited) => {
                reaper::reap_all();
            }
            Ok(Event::Shutdown(signal)) => shutdown::power_off(options, signal.as_str()),
            Ok(Event::Ignored) => {}
            Err(e) => {
                say!("reading signals failed: {e}; reaping by polling");
                reaper::reap_all();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Mounts, console and hostname; returns the hostname and the kernel command line (readable
/// once /proc is mounted). Failures are reported and skipped.
fn set_up(options: &InitOptions) -> (String, KernelCmdline) {
    if !options.skip_system_setup {
        let errors = mounts::mount_all();
        if let Err(e) = console::attach() {
            say!("cannot open /dev/console: {e}");
        }
        for error in errors {
            say!("{}", chain(&error));
        }
        if let Err(e) = network::configure() {
            say!("{}", chain(&e));
        }
    }
    let cmdline = KernelCmdline::read();
    let etc_hostname = std::fs::read_to_string("/etc/hostname").ok();
    let (name, _source, warnings) = hostname::choose(&cmdline, etc_hostname.as_deref());
    for warning in warnings {
        say!("{warning}");
    }
    if !options.skip_system_setup
        && let Err(e) = nix::unistd::sethostname(&name)
    {
        say!("cannot set hostname {name}: {e}");
    }
    (name, cmdline)
}

/// Seconds since boot, from /proc/uptime.
fn read_uptime() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// An error and its causes on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
