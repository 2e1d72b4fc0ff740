//! `roost vm run`: this process becomes the VMM and runs one microVM in the foreground.
//!
//! Exit codes say how the guest ended:
//! - 0: the guest shut down (reboot or power-off: with `reboot=t` a triple fault; an i8042
//!   reset; a KVM power-off event)
//! - 1: the VM could not be started (invalid configuration, missing files, unusable /dev/kvm)
//! - 2: command-line usage error
//! - 3: the guest kernel panicked (the panic line is printed)
//! - 4: the VM failed while running (KVM internal error, unexpected VM exit, device failure)
//! - 5: the VM was stopped by SIGTERM, SIGINT or SIGHUP or the API's `stop` (its threads
//!   joined, files removed)
//!
//! `--restore DIR` restores a snapshot instead of booting (host paths — vsock socket, serial
//! log, API socket — are given anew); `--api-socket PATH` serves the VMM API
//! (`roost_vmm::api`: pause, resume, snapshot, stop) and turns on dirty logging for diff
//! snapshots.

use std::path::PathBuf;

use anyhow::{Context, bail};
use roost_images::{ArtefactIndex, Cache};
use roost_vmm::api::ApiListener;
use roost_vmm::config::{DriveConfig, SeccompMode, SerialConfig, VsockDeviceConfig, vcpus_from};
use roost_vmm::config::{NetDeviceConfig, NetTap, parse_mac};
use roost_vmm::memory::snapshot::RestoreChoice;
use roost_vmm::{BuiltVm, RestoreOptions, VmConfig, VmExit};
use roost_worker::host_check::{Check, HostProbe, Status};

/// Exit code: the guest shut down.
pub const EXIT_SHUTDOWN: i32 = 0;
/// Exit code: the guest kernel panicked.
pub const EXIT_GUEST_PANIC: i32 = 3;
/// Exit code: the VM failed while running.
pub const EXIT_VM_FAILED: i32 = 4;
/// Exit code: the VM was stopped by a signal.
pub const EXIT_STOPPED: i32 = 5;

/// Index names of the default kernel and root filesystem.
const DEFAULT_KERNEL: &str = "kernel";
const DEFAULT_ROOTFS: &str = "rootfs-base";

/// Run a microVM in the foreground (this process is its VMM), booted or restored.
///
/// Exit status: 0 the guest shut down, 1 the VM could not start, 2 usage error, 3 the guest
/// kernel panicked, 4 the VM failed while running, 5 stopped by SIGTERM/SIGINT/SIGHUP or the
/// API's stop.
#[derive(clap::Args, Debug)]
pub struct VmRunArgs {
    /// Restore the snapshot in DIR instead of booting (its vm.state, memory and disk files).
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "rootfs", "rootfs_ro", "cpus", "mem", "cmdline", "append", "vsock_cid",
    ])]
    pub restore: Option<PathBuf>,
    /// How a restored VM's memory comes back: `map` maps the snapshot's memory file
    /// MAP_PRIVATE (clones share its page cache); `uffd` lets a `roost-pager serve` process
    /// (listening on --pager-socket) fill pages on first touch.
    #[arg(long, value_enum, default_value_t = MemoryBackendArg::Map, requires = "restore")]
    pub memory_backend: MemoryBackendArg,
    /// The socket of the `roost-pager serve --snapshot DIR --socket PATH` that serves this
    /// VM's memory (with --memory-backend uffd).
    #[arg(long, value_name = "PATH", requires = "restore")]
    pub pager_socket: Option<PathBuf>,
    /// Serve the VMM API (pause, resume, snapshot, stop; line-delimited JSON) on this Unix
    /// socket; also turns on KVM dirty logging so diff snapshots are possible.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Uncompressed ELF guest kernel [default: `kernel` from the artefact index].
    #[arg(long, value_name = "VMLINUX")]
    pub kernel: Option<PathBuf>,
    /// Root filesystem image, attached as /dev/vda [default: `rootfs-base` from the index,
    /// always read-only].
    #[arg(long, value_name = "IMAGE")]
    pub rootfs: Option<PathBuf>,
    /// Attach the root filesystem read-only.
    #[arg(long)]
    pub rootfs_ro: bool,
    /// Copy-on-write overlay file over the root filesystem (created if missing): the guest
    /// sees a writable disk, its writes go to PATH and the image stays untouched.
    #[arg(long, value_name = "PATH", conflicts_with = "rootfs_ro")]
    pub rootfs_overlay: Option<PathBuf>,
    /// Number of vCPUs (1–16).
    #[arg(long, default_value_t = 1)]
    pub cpus: u64,
    /// Guest memory in MiB (64–32768).
    #[arg(long, default_value_t = 256, value_name = "MiB")]
    pub mem: u64,
    /// Kernel command line, replacing the default (the VMM adds virtio_mmio.device= entries).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Extra kernel parameters appended to the command line (e.g. roost.poweroff_after_ready).
    #[arg(long, value_name = "PARAMS")]
    pub append: Option<String>,
    /// Host side of the guest's vsock device: a Unix socket path.
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    pub vsock_cid: u32,
    /// Attach a virtio-net device to this tap, which must exist in this process's network
    /// namespace (`roost net run` makes one and sets ROOST_VM_NET_TAP for its command).
    #[arg(long, value_name = "NAME", env = "ROOST_VM_NET_TAP")]
    pub net_tap: Option<String>,
    /// Attach a virtio-net device to this inherited, already attached tap fd.
    #[arg(long, value_name = "FD", conflicts_with = "net_tap")]
    pub net_tap_fd: Option<i32>,
    /// The guest's MAC on the network device.
    #[arg(
        long,
        value_name = "MAC",
        env = "ROOST_VM_NET_MAC",
        default_value = "06:00:a9:fe:00:02"
    )]
    pub net_mac: String,
    /// Write the serial console to this file.
    #[arg(long, value_name = "PATH")]
    pub serial_log: Option<PathBuf>,
    /// Also copy the serial console to stdout (the default when --serial-log is not given).
    #[arg(long)]
    pub console: bool,
    /// What seccomp does with a syscall outside a thread's allowlist.
    #[arg(long, value_enum, default_value_t = SeccompArg::Enforce)]
    pub seccomp: SeccompArg,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBackendArg {
    /// Map the memory file MAP_PRIVATE.
    Map,
    /// Anonymous memory filled on demand by a userfaultfd page server (`roost-pager serve`).
    Uffd,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum SeccompArg {
    /// Kill the VMM.
    Enforce,
    /// Allow and write to the kernel audit log (finding missing syscalls).
    Log,
    /// No filters.
    Off,
}

/// The default command line for a root filesystem on the first virtio-blk disk.
pub fn default_cmdline(read_only: bool) -> String {
    let mode = if read_only { "ro" } else { "rw" };
    format!("console=ttyS0 reboot=t panic=-1 root=/dev/vda {mode} rootfstype=ext4 quiet")
}

fn index_path(name: &str) -> anyhow::Result<PathBuf> {
    let cache = Cache::from_env().context("cannot find the artefact cache")?;
    let artefact = ArtefactIndex::new(&cache).lookup(name).with_context(|| {
        format!("no default `{name}`: pass it explicitly or build it with `roost images build`")
    })?;
    Ok(artefact.path)
}

fn config(args: &VmRunArgs) -> anyhow::Result<VmConfig> {
    let kernel = match &args.kernel {
        Some(path) => path.clone(),
        None => index_path(DEFAULT_KERNEL)?,
    };
    // The index's image is the shared cached copy every VM boots from: never attach it
    // writable (with an overlay it is only read, so it may be the overlay's base).
    let (rootfs, read_only) = match &args.rootfs {
        Some(path) => (path.clone(), args.rootfs_ro),
        None => (index_path(DEFAULT_ROOTFS)?, args.rootfs_overlay.is_none()),
    };
    let mut cmdline = args
        .cmdline
        .clone()
        .unwrap_or_else(|| default_cmdline(read_only));
    if let Some(extra) = &args.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let mut config = VmConfig::new(kernel, cmdline);
    config.vcpus = vcpus_from(args.cpus)?;
    config.mem_mib = args.mem;
    config.rootfs = Some(DriveConfig {
        path: rootfs,
        read_only,
        overlay: args.rootfs_overlay.clone(),
    });
    config.vsock = args.vsock_uds.as_ref().map(|path| VsockDeviceConfig {
        guest_cid: args.vsock_cid,
        uds_path: path.clone(),
    });
    let net_tap = match (&args.net_tap, args.net_tap_fd) {
        (_, Some(fd)) => Some(NetTap::Fd(fd)),
        (Some(name), None) => Some(NetTap::Name(name.clone())),
        (None, None) => None,
    };
    config.net = match net_tap {
        Some(tap) => Some(NetDeviceConfig {
            tap,
            mac: parse_mac(&args.net_mac)?,
        }),
        None => None,
    };
    config.serial = serial_config(args);
    config.seccomp = seccomp_mode(args.seccomp);
    config.validate()?;
    Ok(config)
}

fn serial_config(args: &VmRunArgs) -> SerialConfig {
    SerialConfig {
        log_path: args.serial_log.clone(),
        to_stdout: args.console || args.serial_log.is_none(),
    }
}

fn seccomp_mode(arg: SeccompArg) -> SeccompMode {
    match arg {
        SeccompArg::Enforce => SeccompMode::Enforce,
        SeccompArg::Log => SeccompMode::Log,
        SeccompArg::Off => SeccompMode::Off,
    }
}

/// Restore settings from the command line (host paths given anew).
fn restore_options(args: &VmRunArgs) -> anyhow::Result<RestoreOptions> {
    let memory = match (args.memory_backend, &args.pager_socket) {
        (MemoryBackendArg::Map, None) => RestoreChoice::Map,
        (MemoryBackendArg::Map, Some(_)) => {
            bail!("--pager-socket is only used with --memory-backend uffd")
        }
        (MemoryBackendArg::Uffd, Some(socket)) => RestoreChoice::Uffd {
            socket: socket.clone(),
        },
        (MemoryBackendArg::Uffd, None) => bail!(
            "--memory-backend uffd needs --pager-socket PATH: the socket of a running \
             `roost-pager serve --snapshot DIR --socket PATH`"
        ),
    };
    Ok(RestoreOptions {
        memory,
        vsock_uds: args.vsock_uds.clone(),
        serial: serial_config(args),
        seccomp: seccomp_mode(args.seccomp),
        dirty_logging: args.api_socket.is_some(),
        disk_overlay: args.rootfs_overlay.clone(),
    })
}

/// The VM to run: restored from `--restore DIR` or built from the configuration.
fn build_or_restore(args: &VmRunArgs) -> anyhow::Result<BuiltVm> {
    let Some(dir) = &args.restore else {
        let config = config(args)?;
        require_usable_kvm()?;
        return roost_vmm::build_with(&config, args.api_socket.is_some())
            .context("cannot build the VM");
    };
    let options = restore_options(args)?;
    // The state file is checked before KVM: a bad snapshot is refused the same everywhere.
    let snapshot = roost_vmm::read_snapshot(dir)
        .with_context(|| format!("cannot restore from {}", dir.display()))?;
    require_usable_kvm()?;
    roost_vmm::restore_from(snapshot, dir, &options)
        .with_context(|| format!("cannot restore the VM from {}", dir.display()))
}

/// Refuses to start on a /dev/kvm that cannot run guests, saying why and what to do.
fn require_usable_kvm() -> anyhow::Result<()> {
    kvm_verdict(&HostProbe::system().kvm())
}

/// Turns the doctor's KVM check into a refusal (with the host-VM hint) or a go-ahead.
fn kvm_verdict(check: &Check) -> anyhow::Result<()> {
    match check.status {
        Status::Fail => bail!(
            "{}\n  {}\n  to run a VM on this machine use the host VM: \
             `roost hostvm run -- roost vm run ...`",
            check.finding,
            check.recommendation
        ),
        Status::Warn => {
            tracing::warn!(finding = %check.finding, "KVM backend unknown; trying anyway");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The exit code for how the guest ended.
pub fn exit_code(exit: &VmExit) -> i32 {
    match exit {
        VmExit::Shutdown(_) => EXIT_SHUTDOWN,
        VmExit::Stopped => EXIT_STOPPED,
        VmExit::Panic { .. } => EXIT_GUEST_PANIC,
        VmExit::Error { .. } => EXIT_VM_FAILED,
    }
}

pub fn run(args: VmRunArgs) -> anyhow::Result<i32> {
    let vm = build_or_restore(&args)?;
    let api = args
        .api_socket
        .as_deref()
        .map(ApiListener::bind)
        .transpose()
        .context("cannot serve the VMM API")?;
    match &args.restore {
        Some(dir) => tracing::info!(from = %dir.display(), "restoring"),
        None => tracing::info!(cmdline = vm.cmdline(), "booting"),
    }
    vm.stop_on_signals()
        .context("cannot install the stop-signal handler")?;
    let mut running = vm
        .start(roost_vmm::Privileges::Drop)
        .context("cannot start the VM")?;
    if let Some(api) = api {
        running.serve_api(api).context("cannot serve the VMM API")?;
    }
    let exit = running.wait();
    eprintln!("roost vm: {exit}");
    Ok(exit_code(&exit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_vmm::ShutdownReason;

    #[test]
    fn exit_codes_are_distinct_per_outcome() {
        assert_eq!(exit_code(&VmExit::Shutdown(ShutdownReason::TripleFault)), 0);
        assert_eq!(exit_code(&VmExit::Panic { line: "x".into() }), 3);
        assert_eq!(exit_code(&VmExit::Error { detail: "x".into() }), 4);
        assert_eq!(exit_code(&VmExit::Stopped), 5);
    }

    #[test]
    fn an_unusable_kvm_is_refused_with_the_reason_and_the_host_vm_hint() {
        use roost_worker::host_check::{KvmBackend, KvmDevice, check_kvm};
        let pvm = check_kvm(&KvmDevice::ApiVersion(12), KvmBackend::Pvm);
        let err = kvm_verdict(&pvm).unwrap_err().to_string();
        assert!(err.contains("kvm_pvm"), "{err}");
        assert!(err.contains("roost hostvm run -- roost vm run"), "{err}");
        let missing = check_kvm(&KvmDevice::Missing, KvmBackend::Unknown);
        let err = kvm_verdict(&missing).unwrap_err().to_string();
        assert!(err.contains("no /dev/kvm"), "{err}");
        assert!(kvm_verdict(&check_kvm(&KvmDevice::ApiVersion(12), KvmBackend::Amd)).is_ok());
    }

    #[test]
    fn default_cmdline_follows_the_kernel_readme() {
        let line = default_cmdline(true);
        for part in [
            "console=ttyS0",
            "reboot=t",
            "panic=-1",
            "root=/dev/vda",
            " ro ",
            "quiet",
        ] {
            assert!(line.contains(part), "{line}");
        }
        assert!(default_cmdline(false).contains(" rw "));
    }
}
