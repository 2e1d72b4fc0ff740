//! What a VM is made of, and the checks that refuse an impossible VM before anything is built.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Fewest vCPUs a VM may have.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs a VM may have (the guest kernel's `NR_CPUS` and our MP table are sized for it).
pub const MAX_VCPUS: u8 = 16;
/// Smallest guest memory, MiB: the kernel and agent need ~40 MiB to boot.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest guest memory, MiB (32 GiB).
pub const MAX_MEM_MIB: u64 = 32 << 10;

/// The root disk (or any virtio-blk disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    /// The disk image; with `overlay`, the read-only base image.
    pub path: PathBuf,
    pub read_only: bool,
    /// A copy-on-write overlay file over `path` (created if missing): the guest writes go
    /// there and `path` is opened read-only. Not combinable with `read_only`.
    #[serde(default)]
    pub overlay: Option<PathBuf>,
}

/// The vsock device: the host side is a Unix socket at `uds_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockDeviceConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// The network device: a tap (by name in the VMM's network namespace, or an inherited fd)
/// and the guest's MAC. See `docs/networking.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDeviceConfig {
    pub tap: NetTap,
    pub mac: [u8; 6],
}

/// Where the network device's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetTap {
    /// Attach to this tap (it must exist in the VMM's network namespace).
    Name(String),
    /// An attached tap fd inherited from the parent.
    Fd(i32),
}

/// Where the guest's serial console output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConfig {
    /// A log file (created or truncated).
    pub log_path: Option<PathBuf>,
    /// Also copy the console to this process's stdout.
    pub to_stdout: bool,
}

/// How the vCPU and device threads' seccomp filters act on a syscall outside the allowlist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompMode {
    /// Kill the VMM process (production).
    #[default]
    Enforce,
    /// Allow but log to the kernel audit log (to find a missing syscall while developing).
    Log,
    /// No filters (debugging only).
    Off,
}

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// An uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    /// The kernel command line without the `virtio_mmio.device=` entries (the VMM adds them).
    pub cmdline: String,
    pub rootfs: Option<DriveConfig>,
    pub vsock: Option<VsockDeviceConfig>,
    /// Attach a virtio-net device (egress networking).
    #[serde(default)]
    pub net: Option<NetDeviceConfig>,
    /// Attach a virtio-rng device.
    pub rng: bool,
    pub serial: SerialConfig,
    pub seccomp: SeccompMode,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} vCPUs requested: a VM has {MIN_VCPUS} to {MAX_VCPUS} vCPUs")]
    VcpuCount(u64),
    #[error(
        "{0} MiB of memory requested: a VM has {MIN_MEM_MIB} MiB to {MAX_MEM_MIB} MiB (32 GiB)"
    )]
    MemorySize(u64),
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("{what} {path} is neither a regular file nor a block device")]
    NotADisk { what: &'static str, path: PathBuf },
    #[error("the vsock socket's directory {0} does not exist")]
    VsockDirMissing(PathBuf),
    #[error("vsock guest CID {0} is reserved: use 3 or more")]
    ReservedCid(u32),
    #[error("tap name `{0}` must be 1 to 15 bytes without `/` or whitespace")]
    BadTapName(String),
    #[error("tap fd {0} is not a valid file descriptor number")]
    BadTapFd(i32),
    #[error("MAC {0} is multicast: a NIC's MAC must be unicast")]
    MulticastMac(String),
    #[error("`{0}` is not a MAC address (six hex bytes separated by `:`)")]
    BadMac(String),
    #[error("the disk overlay {overlay} makes {base} writable for the guest: drop read-only")]
    ReadOnlyOverlay { base: PathBuf, overlay: PathBuf },
    #[error("the disk overlay {0} must be a regular file (it is created if missing)")]
    OverlayNotAFile(PathBuf),
    #[error("the disk overlay's directory {0} does not exist")]
    OverlayDirMissing(PathBuf),
    #[error("the kernel command line is {len} bytes with the device entries; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
}

impl VmConfig {
    /// A config with defaults for everything but the kernel: 1 vCPU, 256 MiB, no devices.
    pub fn new(kernel: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        Self {
            vcpus: 1,
            mem_mib: 256,
            kernel: kernel.into(),
            cmdline: cmdline.into(),
            rootfs: None,
            vsock: None,
            net: None,
            rng: true,
            serial: SerialConfig::default(),
            seccomp: SeccompMode::Enforce,
        }
    }

    /// Guest memory in bytes (valid after [`VmConfig::validate`]).
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Refuses sizes out of range and files that are not there; says which and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::VcpuCount(self.vcpus.into()));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemorySize(self.mem_mib));
        }
        require_file("kernel", &self.kernel)?;
        if let Some(drive) = &self.rootfs {
            require_disk("root filesystem image", &drive.path)?;
            if let Some(overlay) = &drive.overlay {
                check_overlay(drive, overlay)?;
            }
        }
        if let Some(net) = &self.net {
            check_net(net)?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 {
                return Err(ConfigError::ReservedCid(vsock.guest_cid));
            }
            let dir = match vsock.uds_path.parent() {
                Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
                Some(dir) => dir,
                None => Path::new("/"),
            };
            if !dir.is_dir() {
                return Err(ConfigError::VsockDirMissing(dir.to_owned()));
            }
        }
        Ok(())
    }
}

/// A tap name Linux accepts, a plausible fd, a unicast MAC.
fn check_net(net: &NetDeviceConfig) -> Result<(), ConfigError> {
    match &net.tap {
        NetTap::Name(name)
            if name.is_empty()
                || name.len() > 15
                || name.contains('/')
                || name.chars().any(char::is_whitespace) =>
        {
            return Err(ConfigError::BadTapName(name.clone()));
        }
        NetTap::Fd(fd) if *fd < 0 => return Err(ConfigError::BadTapFd(*fd)),
        _ => {}
    }
    if net.mac[0] & 1 == 1 {
        let text: Vec<String> = net.mac.iter().map(|b| format!("{b:02x}")).collect();
        return Err(ConfigError::MulticastMac(text.join(":")));
    }
    Ok(())
}

/// Parses `06:00:a9:fe:00:02`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::BadMac(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Checks a vCPU count given as a wider integer (command lines) before narrowing it.
pub fn vcpus_from(count: u64) -> Result<u8, ConfigError> {
    u8::try_from(count)
        .ok()
        .filter(|n| (MIN_VCPUS..=MAX_VCPUS).contains(n))
        .ok_or(ConfigError::VcpuCount(count))
}

fn require_disk(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() || meta.file_type().is_block_device() => Ok(()),
        Ok(_) => Err(ConfigError::NotADisk {
            what,
            path: path.to_owned(),
        }),
        Err(_) => Err(ConfigError::Missing {
            what,
            path: path.to_owned(),
        }),
    }
}

/// An overlay is a writable regular file or a path to create in an existing directory.
fn check_overlay(drive: &DriveConfig, overlay: &Path) -> Result<(), ConfigError> {
    if drive.read_only {
        return Err(ConfigError::ReadOnlyOverlay {
            base: drive.path.clone(),
            overlay: overlay.to_owned(),
        });
    }
    match std::fs::metadata(overlay) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::OverlayNotAFile(overlay.to_owned())),
        Err(_) => {
            let dir = match overlay.parent() {
                Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
                Some(dir) => dir,
                None => Path::new("/"),
            };
            if dir.is_dir() {
                Ok(())
            } else {
                Err(ConfigError::OverlayDirMissing(dir.to_owned()))
            }
        }
    }
}

fn require_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::NotAFile {
            what,
            path: path.to_owned(),
        }),
        Err(_) => Err(ConfigError::Missing {
            what,
            path: path.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        VmConfig::new(kernel, "console=ttyS0")
    }

    #[test]
    fn accepts_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = valid(dir.path());
        for (vcpus, mem) in [(1, 64), (16, 32 << 10)] {
            cfg.vcpus = vcpus;
            cfg.mem_mib = mem;
            assert_eq!(cfg.validate(), Ok(()));
        }
    }

    #[test]
    fn refuses_out_of_range_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = valid(dir.path());
        for vcpus in [0, 17] {
            cfg.vcpus = vcpus;
            assert_eq!(cfg.validate(), Err(ConfigError::VcpuCount(vcpus.into())));
        }
        cfg.vcpus = 2;
        for mem in [63, (32 << 10) + 1] {
            cfg.mem_mib = mem;
            let err = cfg.validate().unwrap_err();
            assert_eq!(err, ConfigError::MemorySize(mem));
            assert!(err.to_string().contains("64 MiB to 32768 MiB"), "{err}");
        }
        assert_eq!(vcpus_from(300), Err(ConfigError::VcpuCount(300)));
        assert_eq!(vcpus_from(16), Ok(16));
    }

    #[test]
    fn refuses_missing_files_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = valid(dir.path());
        cfg.rootfs = Some(DriveConfig {
            path: dir.path().join("nope.ext4"),
            read_only: true,
            overlay: None,
        });
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("root filesystem image"), "{err}");
        assert!(err.to_string().contains("nope.ext4"), "{err}");
        cfg.rootfs = Some(DriveConfig {
            path: dir.path().to_owned(),
            read_only: false,
            overlay: None,
        });
        assert!(matches!(cfg.validate(), Err(ConfigError::NotADisk { .. })));
        cfg.rootfs = None;
        cfg.kernel = dir.path().to_owned();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::NotAFile { what: "kernel", .. })
        ));
    }

    #[test]
    fn refuses_bad_net_settings() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = valid(dir.path());
        let mac = [0x06, 0, 0xa9, 0xfe, 0, 2];
        cfg.net = Some(NetDeviceConfig {
            tap: NetTap::Name("tap0".into()),
            mac,
        });
        assert_eq!(cfg.validate(), Ok(()));
        for bad in ["", "a-very-long-tap-name", "a/b", "a b"] {
            cfg.net = Some(NetDeviceConfig {
                tap: NetTap::Name(bad.into()),
                mac,
            });
            assert_eq!(cfg.validate(), Err(ConfigError::BadTapName(bad.into())));
        }
        cfg.net = Some(NetDeviceConfig {
            tap: NetTap::Fd(-1),
            mac,
        });
        assert_eq!(cfg.validate(), Err(ConfigError::BadTapFd(-1)));
        let multicast = [0x01, 0, 0x5e, 0, 0, 1];
        cfg.net = Some(NetDeviceConfig {
            tap: NetTap::Fd(3),
            mac: multicast,
        });
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("01:00:5e:00:00:01"), "{err}");
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("06:00:a9:fe:00:02"), Ok([6, 0, 0xa9, 0xfe, 0, 2]));
        for bad in [
            "",
            "06:00:a9:fe:00",
            "06:00:a9:fe:00:02:03",
            "6:0:a9:fe:0:2",
            "zz:00:a9:fe:00:02",
        ] {
            assert_eq!(
                parse_mac(bad),
                Err(ConfigError::BadMac(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn checks_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = valid(dir.path());
        let base = dir.path().join("base.ext4");
        std::fs::write(&base, [0u8; 512]).unwrap();
        let mut drive = DriveConfig {
            path: base.clone(),
            read_only: false,
            overlay: Some(dir.path().join("new.cow")),
        };
        cfg.rootfs = Some(drive.clone());
        assert_eq!(cfg.validate(), Ok(()), "a missing overlay is created");
        drive.read_only = true;
        cfg.rootfs = Some(drive.clone());
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::ReadOnlyOverlay { .. })
        ));
        drive.read_only = false;
        drive.overlay = Some(dir.path().to_owned());
        cfg.rootfs = Some(drive.clone());
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::OverlayNotAFile(_))
        ));
        drive.overlay = Some(dir.path().join("absent/x.cow"));
        cfg.rootfs = Some(drive);
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::OverlayDirMissing(_))
        ));
        let old: DriveConfig = serde_json::from_str(r#"{"path":"/b","read_only":true}"#).unwrap();
        assert_eq!(old.overlay, None, "configs from before overlays still load");
    }

    #[test]
    fn refuses_bad_vsock_settings() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = valid(dir.path());
        cfg.vsock = Some(VsockDeviceConfig {
            guest_cid: 2,
            uds_path: dir.path().join("v.sock"),
        });
        assert_eq!(cfg.validate(), Err(ConfigError::ReservedCid(2)));
        cfg.vsock = Some(VsockDeviceConfig {
            guest_cid: 3,
            uds_path: dir.path().join("absent/v.sock"),
        });
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::VsockDirMissing(_))
        ));
    }
}
