//! What a microVM is booted from, and the checks that run before anything is created or
//! spawned: a bad configuration is refused with a message that names the field, never turned
//! into a VMM that fails later with a less helpful one.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// vCPU bounds the VMM accepts.
pub const CPUS: std::ops::RangeInclusive<u32> = 1..=16;
/// Guest memory bounds (MiB) the VMM accepts.
pub const MEM_MIB: std::ops::RangeInclusive<u64> = 64..=32 * 1024;

/// The longest socket path the VMM and the ready listener create inside the runtime
/// directory (`vsock.sock_1024`), counted into `sun_path`'s 108 bytes with its NUL.
const LONGEST_SOCKET_NAME: &str = "vsock.sock_1024";
const SUN_PATH_MAX: usize = 107;

/// How the root filesystem image is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsMode {
    /// The shared image, read-only (`--rootfs-ro`); the guest mounts `/` read-only.
    ReadOnly,
    /// A private copy in the runtime directory, writable, deleted with the VM.
    WritableCopy,
    /// The shared image read-only under a copy-on-write overlay file in the runtime directory:
    /// the guest sees a writable disk, the image stays untouched, and snapshots carry the
    /// overlay's clusters (a template built so gives every clone its own writable disk).
    Overlay,
    /// `rootfs` is the sandbox's own writable disk already (e.g. a device-mapper snapshot of
    /// the image, `roost_worker::disk::DmSnapshot`): attached writable as it is.
    Device,
}

/// What the VMM's seccomp filters do with a syscall outside a thread's allowlist
/// (`roost vm run --seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    Enforce,
    Log,
    Off,
}

impl SeccompMode {
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Log => "log",
            Self::Off => "off",
        }
    }
}

/// Everything needed to boot one microVM.
#[derive(Debug, Clone)]
pub struct VmHandleConfig {
    /// The `roost` binary whose `vm run` becomes the VMM.
    pub vmm_binary: PathBuf,
    /// Uncompressed ELF guest kernel.
    pub kernel: PathBuf,
    /// Root filesystem image.
    pub rootfs: PathBuf,
    pub rootfs_mode: RootfsMode,
    pub cpus: u32,
    pub mem_mib: u64,
    /// Kernel parameters appended to the VMM's default command line (`--append`).
    pub cmdline_extra: Option<String>,
    /// Per-VM directory (created with mode 0700, must not exist yet; its parent must):
    /// vsock socket, serial log, VMM stderr, a writable rootfs copy. Removed with the handle.
    pub runtime_dir: PathBuf,
    /// How long the agent may take to announce itself after the VMM starts.
    pub ready_timeout: Duration,
    pub seccomp: SeccompMode,
    /// Serve the VMM's control API (`--api-socket`) so that the handle can pause, resume and
    /// snapshot the VM. Off by default: with it the VMM keeps dirty-page logging on.
    pub control_api: bool,
    /// Give the VM a virtio-net device on this tap, with the VMM started in its namespace.
    pub net: Option<NetAttachment>,
}

/// Where a VM's network device attaches: a tap in a named network namespace
/// (`/var/run/netns/<netns>`, e.g. a `roost_net` slot), which the VMM is started in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetAttachment {
    pub netns: String,
    pub tap: String,
}

impl VmHandleConfig {
    /// A 1-vCPU, 256 MiB VM with a read-only root, the `roost` binary next to the current
    /// executable as its VMM, and a 60 s ready timeout.
    pub fn new(
        kernel: impl Into<PathBuf>,
        rootfs: impl Into<PathBuf>,
        runtime_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            vmm_binary: default_vmm_binary(),
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            rootfs_mode: RootfsMode::ReadOnly,
            cpus: 1,
            mem_mib: 256,
            cmdline_extra: None,
            runtime_dir: runtime_dir.into(),
            ready_timeout: Duration::from_secs(60),
            seccomp: SeccompMode::Enforce,
            control_api: false,
            net: None,
        }
    }

    /// Checks bounds, files (regular files or block devices: the host VM attaches images as
    /// `/dev/roost/<name>`) and paths; creates nothing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !CPUS.contains(&self.cpus) {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if !MEM_MIB.contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        regular_file("VMM binary", &self.vmm_binary)?;
        regular_file("kernel", &self.kernel)?;
        regular_file("root filesystem", &self.rootfs)?;
        if let Some(extra) = &self.cmdline_extra
            && extra.chars().any(|c| c == '\0' || c == '\n')
        {
            return Err(ConfigError::Cmdline(extra.clone()));
        }
        if self.ready_timeout.is_zero() {
            return Err(ConfigError::ReadyTimeout);
        }
        validate_runtime_dir(&self.runtime_dir)
    }
}

/// Everything needed to restore one microVM from a snapshot. The VM's shape (vCPUs, memory,
/// devices, kernel command line) is the snapshot's; host-side paths are given anew.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The `roost` binary whose `vm run --restore` becomes the VMM.
    pub vmm_binary: PathBuf,
    /// A snapshot directory written by the VMM's `snapshot` request (holds `vm.state`).
    pub snapshot_dir: PathBuf,
    /// Per-VM directory, as for [`VmHandleConfig::runtime_dir`].
    pub runtime_dir: PathBuf,
    /// How long the restored agent may take to take its identity.
    pub ready_timeout: Duration,
    pub seccomp: SeccompMode,
    /// How guest memory comes back.
    pub memory: RestoreMemory,
    /// The network namespace (`/var/run/netns/<name>`) the VMM starts in. A snapshot with a
    /// network device reattaches to the tap of the saved name there, so it must hold one.
    pub netns: Option<String>,
}

/// How a restored VM's memory comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreMemory {
    /// The snapshot's memory file mapped `MAP_PRIVATE`: clones of one snapshot share its page
    /// cache, and pages are read on first touch by the kernel.
    Map,
    /// Anonymous memory filled on first touch by a `roost-pager serve` child process that the
    /// handle starts (and stops with the VM).
    Uffd(PagerOptions),
}

/// The page server of a [`RestoreMemory::Uffd`] restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagerOptions {
    /// The `roost-pager` binary.
    pub binary: PathBuf,
    /// Copy the pages of this recorded working set in before serving faults in any order.
    pub prefetch: Option<PathBuf>,
    /// Record the pages the VM touches into this file, written when
    /// [`super::VmHandle::record_working_set`] is called (or when the VMM goes away).
    pub record: Option<PathBuf>,
}

impl PagerOptions {
    /// `roost-pager` next to the current executable, nothing prefetched or recorded.
    pub fn new() -> Self {
        Self {
            binary: sibling_binary("roost-pager"),
            prefetch: None,
            record: None,
        }
    }
}

impl Default for PagerOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The state file every snapshot directory holds.
pub const SNAPSHOT_STATE_FILE: &str = "vm.state";

impl RestoreConfig {
    /// The `roost` next to the current executable, a 60 s ready timeout and enforced seccomp.
    pub fn new(snapshot_dir: impl Into<PathBuf>, runtime_dir: impl Into<PathBuf>) -> Self {
        Self {
            vmm_binary: default_vmm_binary(),
            snapshot_dir: snapshot_dir.into(),
            runtime_dir: runtime_dir.into(),
            ready_timeout: Duration::from_secs(60),
            seccomp: SeccompMode::Enforce,
            memory: RestoreMemory::Map,
            netns: None,
        }
    }

    /// Checks the binary, the snapshot directory and the runtime directory; creates nothing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        regular_file("VMM binary", &self.vmm_binary)?;
        if !self.snapshot_dir.is_absolute() {
            return Err(ConfigError::SnapshotRelative(self.snapshot_dir.clone()));
        }
        regular_file(
            "snapshot state",
            &self.snapshot_dir.join(SNAPSHOT_STATE_FILE),
        )?;
        if self.ready_timeout.is_zero() {
            return Err(ConfigError::ReadyTimeout);
        }
        if let RestoreMemory::Uffd(pager) = &self.memory {
            regular_file("page server binary", &pager.binary)?;
            if let Some(prefetch) = &pager.prefetch {
                regular_file("working set", prefetch)?;
            }
        }
        validate_runtime_dir(&self.runtime_dir)
    }
}

fn validate_runtime_dir(dir: &Path) -> Result<(), ConfigError> {
    if !dir.is_absolute() {
        return Err(ConfigError::RuntimeDirRelative(dir.to_owned()));
    }
    let longest = dir.join(LONGEST_SOCKET_NAME);
    if longest.as_os_str().len() > SUN_PATH_MAX {
        return Err(ConfigError::RuntimeDirTooLong {
            dir: dir.to_owned(),
            max: SUN_PATH_MAX - LONGEST_SOCKET_NAME.len() - 1,
        });
    }
    if std::fs::symlink_metadata(dir).is_ok() {
        return Err(ConfigError::RuntimeDirExists(dir.to_owned()));
    }
    match dir.parent() {
        Some(parent) if parent.is_dir() => Ok(()),
        _ => Err(ConfigError::RuntimeDirParent(dir.to_owned())),
    }
}

fn regular_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() || meta.file_type().is_block_device() => Ok(()),
        Ok(_) => Err(ConfigError::NotAFile {
            what,
            path: path.to_owned(),
        }),
        Err(source) => Err(ConfigError::Missing {
            what,
            path: path.to_owned(),
            source,
        }),
    }
}

/// `roost` next to the current executable (release installs put every binary together; the
/// host VM copies them all to `/opt/roost/bin`).
pub fn default_vmm_binary() -> PathBuf {
    sibling_binary("roost")
}

/// `name` next to the current executable (else looked up on `PATH`).
fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A configuration that cannot boot.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} vCPUs requested; the VMM supports {min} to {max}", min = CPUS.start(), max = CPUS.end())]
    Cpus(u32),
    #[error("{0} MiB of guest memory requested; the VMM supports {min} to {max} MiB", min = MEM_MIB.start(), max = MEM_MIB.end())]
    Memory(u64),
    #[error("{what} {} is not usable", path.display())]
    Missing {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} is neither a regular file nor a block device", path.display())]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("extra kernel parameters may not contain NUL or newline: {0:?}")]
    Cmdline(String),
    #[error("the ready timeout must be longer than zero")]
    ReadyTimeout,
    #[error("runtime directory {} must be an absolute path", .0.display())]
    RuntimeDirRelative(PathBuf),
    #[error("runtime directory {} is too long for Unix socket paths (at most {max} bytes)", dir.display())]
    RuntimeDirTooLong { dir: PathBuf, max: usize },
    #[error("runtime directory {} already exists (another VM's, or a stale one)", .0.display())]
    RuntimeDirExists(PathBuf),
    #[error("the parent of runtime directory {} is not a directory", .0.display())]
    RuntimeDirParent(PathBuf),
    #[error("snapshot directory {} must be an absolute path", .0.display())]
    SnapshotRelative(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid configuration over files in `dir`.
    fn valid(dir: &Path) -> VmHandleConfig {
        for name in ["roost", "vmlinux", "rootfs.ext4"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let mut config = VmHandleConfig::new(
            dir.join("vmlinux"),
            dir.join("rootfs.ext4"),
            dir.join("vm1"),
        );
        config.vmm_binary = dir.join("roost");
        config
    }

    #[test]
    fn a_complete_configuration_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = valid(dir.path());
        config.cpus = 16;
        config.mem_mib = 32 * 1024;
        config.cmdline_extra = Some("roost.poweroff_after_ready init=/sbin/init".into());
        config.validate().unwrap();
    }

    #[test]
    fn sizes_outside_the_vmm_bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        for cpus in [0, 17] {
            let config = VmHandleConfig {
                cpus,
                ..base.clone()
            };
            let error = config.validate().unwrap_err();
            assert!(
                matches!(error, ConfigError::Cpus(n) if n == cpus),
                "{error}"
            );
            assert!(error.to_string().contains("1 to 16"), "{error}");
        }
        for mem_mib in [63, 32 * 1024 + 1] {
            let config = VmHandleConfig {
                mem_mib,
                ..base.clone()
            };
            let error = config.validate().unwrap_err();
            assert!(
                matches!(error, ConfigError::Memory(n) if n == mem_mib),
                "{error}"
            );
        }
    }

    #[test]
    fn missing_files_and_directories_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        let missing = dir.path().join("nope");
        let config = VmHandleConfig {
            kernel: missing.clone(),
            ..base.clone()
        };
        let error = config.validate().unwrap_err();
        assert!(error.to_string().starts_with("kernel "), "{error}");
        assert!(error.to_string().contains("nope"), "{error}");
        let config = VmHandleConfig {
            vmm_binary: missing,
            ..base.clone()
        };
        assert!(matches!(
            config.validate().unwrap_err(),
            ConfigError::Missing {
                what: "VMM binary",
                ..
            }
        ));
        let config = VmHandleConfig {
            rootfs: dir.path().to_owned(),
            ..base
        };
        assert!(matches!(
            config.validate().unwrap_err(),
            ConfigError::NotAFile {
                what: "root filesystem",
                ..
            }
        ));
    }

    #[test]
    fn bad_command_line_and_timeout_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        let config = VmHandleConfig {
            cmdline_extra: Some("quiet\ninit=/bin/sh".into()),
            ..base.clone()
        };
        assert!(matches!(
            config.validate().unwrap_err(),
            ConfigError::Cmdline(_)
        ));
        let config = VmHandleConfig {
            ready_timeout: Duration::ZERO,
            ..base
        };
        assert!(matches!(
            config.validate().unwrap_err(),
            ConfigError::ReadyTimeout
        ));
    }

    #[test]
    fn a_restore_needs_an_absolute_snapshot_with_its_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        let snapshot = dir.path().join("snap");
        std::fs::create_dir(&snapshot).unwrap();
        let mut config = RestoreConfig::new(&snapshot, dir.path().join("vm2"));
        config.vmm_binary = base.vmm_binary;
        let error = config.validate().unwrap_err();
        assert!(
            matches!(
                &error,
                ConfigError::Missing {
                    what: "snapshot state",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("vm.state"), "{error}");
        std::fs::write(snapshot.join(SNAPSHOT_STATE_FILE), b"state").unwrap();
        config.validate().unwrap();
        let relative = RestoreConfig {
            snapshot_dir: "snap".into(),
            ..config.clone()
        };
        assert!(matches!(
            relative.validate().unwrap_err(),
            ConfigError::SnapshotRelative(_)
        ));
        let taken = RestoreConfig {
            runtime_dir: snapshot,
            ..config
        };
        assert!(matches!(
            taken.validate().unwrap_err(),
            ConfigError::RuntimeDirExists(_)
        ));
    }

    #[test]
    fn runtime_dir_must_be_new_absolute_short_and_under_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        let check = |runtime_dir: PathBuf| {
            VmHandleConfig {
                runtime_dir,
                ..base.clone()
            }
            .validate()
            .unwrap_err()
        };
        assert!(matches!(
            check(PathBuf::from("relative/vm")),
            ConfigError::RuntimeDirRelative(_)
        ));
        assert!(matches!(
            check(dir.path().to_owned()),
            ConfigError::RuntimeDirExists(_)
        ));
        assert!(matches!(
            check(dir.path().join("missing-parent/vm")),
            ConfigError::RuntimeDirParent(_)
        ));
        let long = dir.path().join("v".repeat(100));
        let error = check(long);
        assert!(
            matches!(error, ConfigError::RuntimeDirTooLong { .. }),
            "{error}"
        );
    }
}
