//! The host VM rig: runs a command inside a QEMU TCG virtual machine with emulated AMD SVM, in
//! which `kvm_amd` gives a real `/dev/kvm`, for machines whose own `/dev/kvm` cannot run guests
//! (the recipe is in the shared design notes, HOSTVM.md).
//!
//! ```no_run
//! # fn main() -> Result<(), roost_hostvm::HostVmError> {
//! let outcome = roost_hostvm::HostVm::builder()
//!     .cpus(2)
//!     .capture_output()
//!     .run(["sh", "-c", "ls /dev/kvm; exit 7"])?;
//! assert_eq!(outcome.exit_code, 7);
//! # Ok(()) }
//! ```
//!
//! The host VM boots Debian's cloud kernel ([`kernel`]) with a cached base initramfs
//! ([`initramfs`]) plus a per-run archive ([`overlay`]) carrying the project's binaries, the
//! command and an artefact index with in-VM paths; built images are attached as read-only
//! virtio disks. The command's stdout and stderr travel on their own virtio-serial ports, and
//! `/init` reports progress and the exit status on a third ([`protocol`]), so kernel console
//! noise never mixes into the command's output.
//!
//! TCG is not a perfect machine: now and then a vCPU hangs during kernel start-up (the boot is
//! retried: [`HostVmError::BootHang`]), and now and then the whole host VM wedges while nested
//! guests run (soft lockups of both vCPUs, or plain silence). `/init` therefore sends a
//! heartbeat, and a host VM that falls silent for a minute is killed
//! ([`HostVmError::Unresponsive`]) instead of holding the caller until its overall timeout;
//! test scripts ([`script`]) then run again in a fresh host VM.

pub mod cpio;
pub mod forward;
pub mod initramfs;
pub mod kernel;
pub mod ldd;
pub mod modules;
pub mod overlay;
pub mod protocol;
pub mod qemu;
pub mod script;
mod vm;

use std::path::PathBuf;
use std::time::Duration;

pub use forward::{Forward, ForwardParseError};
pub use vm::{
    BootTimes, Event, HostVm, IMAGE_NAMES, KERNEL_NAME, Output, OutputLine, RunOutcome, StreamKind,
    cancel_on_signals,
};

/// Errors preparing or running the host VM.
#[derive(Debug, thiserror::Error)]
pub enum HostVmError {
    #[error("no command given: pass the command to run inside the host VM")]
    NoCommand,
    #[error("environment variable name `{0}` is not valid for a shell")]
    BadEnv(String),
    #[error("cannot find the host VM kernel: {0}")]
    KernelPackage(String),
    #[error("kernel module `{module}` is not available for {release}: {message}")]
    ModuleMissing {
        module: String,
        release: String,
        message: String,
    },
    #[error("{path} is missing ({hint})")]
    MissingHostFile { path: PathBuf, hint: &'static str },
    #[error("{what}")]
    Tool {
        what: &'static str,
        #[source]
        source: roost_images::RunError,
    },
    #[error("cannot resolve shared libraries")]
    Ldd(#[source] ldd::LddError),
    #[error("cannot build the initramfs")]
    Cpio(#[from] cpio::CpioError),
    #[error("artefact cache")]
    Cache(#[from] roost_images::CacheError),
    #[error("artefact index")]
    Index(#[from] roost_images::IndexError),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {} (apt-get install qemu-system-x86)", qemu::QEMU_BINARY)]
    QemuSpawn(#[source] std::io::Error),
    #[error("QEMU did not open its sockets within {waited:?}; QEMU said:\n{qemu_log}")]
    QemuSockets { waited: Duration, qemu_log: String },
    #[error(
        "host VM setup failed at `{stage}` before the command ran: {message}\n--- host VM console (last lines) ---\n{console}"
    )]
    Setup {
        stage: String,
        message: String,
        console: String,
    },
    #[error(
        "the host VM stopped ({status}) before the command finished (last stage: {stage})\n--- QEMU ---\n{qemu_log}\n--- host VM console (last lines) ---\n{console}"
    )]
    Stopped {
        status: String,
        stage: String,
        qemu_log: String,
        console: String,
    },
    #[error(
        "the host VM run exceeded its {limit:?} timeout (last stage: {stage}); QEMU was killed\n--- command output so far (last lines; captured runs only) ---\n{output}\n--- host VM console (last lines) ---\n{console}"
    )]
    Timeout {
        limit: Duration,
        stage: String,
        /// The tail of what the command printed before the timeout (with
        /// [`HostVm::capture_output`]; otherwise it went to this process's stdout already).
        output: String,
        console: String,
    },
    /// `/init` stopped sending its heartbeat ([`protocol::HEARTBEAT_SECS`]): the host VM's
    /// kernel is wedged, which TCG does now and then (soft lockups of both vCPUs, seen while
    /// nested guests run). Nothing inside the host VM can be trusted to finish; a fresh run can.
    #[error(
        "the host VM fell silent for {silent_for:?} (no heartbeat from its /init, last stage: {stage}); QEMU was killed\n--- command output so far (last lines; captured runs only) ---\n{output}\n--- host VM console (last lines) ---\n{console}"
    )]
    Unresponsive {
        silent_for: Duration,
        stage: String,
        output: String,
        console: String,
    },
    #[error(
        "the host VM kernel did not reach /init within {waited:?} (TCG hangs a vCPU now and then; it was retried)\n--- host VM console (last lines) ---\n{console}"
    )]
    BootHang { waited: Duration, console: String },
    #[error("interrupted; QEMU was stopped")]
    Cancelled,
}
