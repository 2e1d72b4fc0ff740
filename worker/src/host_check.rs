//! Checks of the host features Roost needs, each with a one-line recommendation.
//!
//! The checks read the machine through a root path (normally `/`) so that their decision logic
//! can be tested against fake `/sys` and `/proc` trees. The one check that needs a real device,
//! opening `/dev/kvm` and asking its API version, is kept apart in [`kvm_device_state`].

mod cgroup;
mod kvm;
mod tuning;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use cgroup::check_cgroup_v2;
pub use kvm::{KvmBackend, KvmDevice, check_kvm, kvm_device_state};
pub use tuning::{check_favordynmods, check_nx_huge_pages};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The feature is present and usable.
    Ok,
    /// Roost works, but slower or with a fallback.
    Warn,
    /// Roost cannot use this feature here.
    Fail,
}

/// One finding of `roost doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name, such as `kvm`.
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub finding: String,
    /// What to do about it, in one line.
    pub recommendation: String,
}

impl Check {
    fn new(
        name: &'static str,
        status: Status,
        finding: impl Into<String>,
        rec: impl Into<String>,
    ) -> Self {
        Self {
            name,
            status,
            finding: finding.into(),
            recommendation: rec.into(),
        }
    }
}

/// Minimum free space recommended for the cache (kernel build tree, images, snapshots).
pub const RECOMMENDED_FREE_BYTES: u64 = 20 << 30;

/// Reads host facts below a root directory.
#[derive(Debug, Clone)]
pub struct HostProbe {
    root: PathBuf,
}

impl HostProbe {
    /// Probes the running system.
    pub fn system() -> Self {
        Self {
            root: PathBuf::from("/"),
        }
    }

    /// Probes a fake system tree (tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, absolute: &str) -> PathBuf {
        self.root.join(absolute.trim_start_matches('/'))
    }

    fn is_system(&self) -> bool {
        self.root == Path::new("/")
    }

    /// Every check, in the order `roost doctor` prints them; `data_dir` is where Roost keeps
    /// its cache (its free space is checked).
    pub fn all(&self, data_dir: &Path) -> Vec<Check> {
        vec![
            self.kvm(),
            self.userfaultfd(),
            self.tun(),
            self.device_mapper(),
            self.cgroup_v2(),
            self.cgroup_favordynmods(),
            self.kvm_nx_huge_pages(),
            check_free_disk(data_dir),
        ]
    }

    /// Whether KVM can run microVM guests here.
    pub fn kvm(&self) -> Check {
        let device = if self.is_system() {
            kvm_device_state(&self.path("/dev/kvm"))
        } else if self.path("/dev/kvm").exists() {
            KvmDevice::ApiVersion(kvm::KVM_API_VERSION)
        } else {
            KvmDevice::Missing
        };
        check_kvm(&device, self.kvm_backend())
    }

    fn kvm_backend(&self) -> KvmBackend {
        let loaded = |module: &str| self.path(&format!("/sys/module/{module}")).is_dir();
        if loaded("kvm_pvm") {
            KvmBackend::Pvm
        } else if loaded("kvm_intel") {
            KvmBackend::Intel
        } else if loaded("kvm_amd") {
            KvmBackend::Amd
        } else {
            KvmBackend::Unknown
        }
    }

    /// userfaultfd, for the lazy-restore page server.
    pub fn userfaultfd(&self) -> Check {
        let device = self.path("/dev/userfaultfd");
        let unprivileged =
            std::fs::read_to_string(self.path("/proc/sys/vm/unprivileged_userfaultfd"))
                .map(|s| s.trim() == "1")
                .unwrap_or(false);
        if device.exists() {
            Check::new(
                "userfaultfd",
                Status::Ok,
                "/dev/userfaultfd present",
                "none: lazy restore through the page server is available",
            )
        } else if unprivileged {
            Check::new(
                "userfaultfd",
                Status::Ok,
                "userfaultfd(2) allowed for unprivileged processes",
                "none: lazy restore through the page server is available",
            )
        } else {
            Check::new(
                "userfaultfd",
                Status::Warn,
                "no /dev/userfaultfd and unprivileged userfaultfd(2) is off",
                "use a kernel ≥ 5.11 (for /dev/userfaultfd) or run the worker as root; otherwise restores use mapped memory files only",
            )
        }
    }

    /// /dev/net/tun, for sandbox egress networking.
    pub fn tun(&self) -> Check {
        if self.path("/dev/net/tun").exists() {
            Check::new(
                "tun",
                Status::Ok,
                "/dev/net/tun present",
                "none: sandboxes can get tap devices",
            )
        } else {
            Check::new(
                "tun",
                Status::Warn,
                "no /dev/net/tun",
                "`modprobe tun` (CONFIG_TUN); without it sandboxes get no internet access",
            )
        }
    }

    /// device-mapper, for the optional dm-snapshot disk backend.
    pub fn device_mapper(&self) -> Check {
        let misc = std::fs::read_to_string(self.path("/proc/misc")).unwrap_or_default();
        let in_misc = misc
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("device-mapper"));
        if in_misc || self.path("/dev/mapper/control").exists() {
            Check::new(
                "device-mapper",
                Status::Ok,
                "device-mapper available",
                "none: the dm-snapshot disk backend can be chosen",
            )
        } else {
            Check::new(
                "device-mapper",
                Status::Warn,
                "no device-mapper in this kernel",
                "`modprobe dm_mod dm_snapshot` if available; otherwise Roost uses its built-in copy-on-write disks (the default)",
            )
        }
    }

    /// The cgroup v2 hierarchy and its controllers, for per-sandbox resource limits.
    pub fn cgroup_v2(&self) -> Check {
        let mountinfo =
            std::fs::read_to_string(self.path("/proc/self/mountinfo")).unwrap_or_default();
        check_cgroup_v2(&mountinfo, |mount_point| {
            std::fs::read_to_string(self.path(mount_point).join("cgroup.controllers")).ok()
        })
    }

    /// Whether cgroup v2 is mounted with `favordynmods` where the kernel has it (VM creation
    /// speed; see the `tuning` module).
    pub fn cgroup_favordynmods(&self) -> Check {
        let features = self.read("/sys/kernel/cgroup/features");
        let mountinfo = self.read("/proc/self/mountinfo").unwrap_or_default();
        check_favordynmods(features.as_deref(), &mountinfo)
    }

    /// Whether `kvm.nx_huge_pages` costs a kernel thread per VM for no security benefit.
    pub fn kvm_nx_huge_pages(&self) -> Check {
        check_nx_huge_pages(
            self.read("/sys/module/kvm/parameters/nx_huge_pages")
                .as_deref(),
            self.read("/sys/devices/system/cpu/vulnerabilities/itlb_multihit")
                .as_deref(),
        )
    }

    fn read(&self, absolute: &str) -> Option<String> {
        std::fs::read_to_string(self.path(absolute)).ok()
    }
}

/// Free space where Roost keeps its data.
pub fn check_free_disk(data_dir: &Path) -> Check {
    let existing = data_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match nix::sys::statvfs::statvfs(existing) {
        Ok(stat) => {
            let free = stat.blocks_available().saturating_mul(stat.fragment_size());
            let finding = format!("{} free at {}", human_bytes(free), existing.display());
            if free >= RECOMMENDED_FREE_BYTES {
                Check::new("disk", Status::Ok, finding, "none")
            } else {
                Check::new(
                    "disk",
                    Status::Warn,
                    finding,
                    format!(
                        "free space or point ROOST_CACHE_DIR elsewhere: builds and snapshots want ≥ {}",
                        human_bytes(RECOMMENDED_FREE_BYTES)
                    ),
                )
            }
        }
        Err(e) => Check::new(
            "disk",
            Status::Warn,
            format!("cannot read free space at {}: {e}", existing.display()),
            "check that the cache directory is on a mounted file system",
        ),
    }
}

/// Formats a byte count with a binary unit (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fake_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for d in ["dev/net", "sys/module/kvm", "proc/self", "proc/sys/vm"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        dir
    }

    #[test]
    fn pvm_backed_kvm_is_not_usable_and_points_to_the_host_vm() {
        let root = fake_root();
        fs::write(root.path().join("dev/kvm"), "").unwrap();
        fs::create_dir_all(root.path().join("sys/module/kvm_pvm")).unwrap();
        let check = HostProbe::at(root.path()).kvm();
        assert_eq!(check.status, Status::Fail);
        assert!(check.finding.contains("PVM"), "{}", check.finding);
        assert!(
            check.recommendation.contains("roost hostvm run"),
            "{}",
            check.recommendation
        );
    }

    #[test]
    fn amd_backed_kvm_is_usable() {
        let root = fake_root();
        fs::write(root.path().join("dev/kvm"), "").unwrap();
        fs::create_dir_all(root.path().join("sys/module/kvm_amd")).unwrap();
        assert_eq!(HostProbe::at(root.path()).kvm().status, Status::Ok);
    }

    #[test]
    fn missing_kvm_device_fails() {
        let root = fake_root();
        let check = HostProbe::at(root.path()).kvm();
        assert_eq!(check.status, Status::Fail);
        assert!(check.recommendation.contains("roost hostvm run"));
    }

    #[test]
    fn device_checks_follow_the_tree() {
        let root = fake_root();
        let probe = HostProbe::at(root.path());
        assert_eq!(probe.tun().status, Status::Warn);
        assert_eq!(probe.userfaultfd().status, Status::Warn);
        assert_eq!(probe.device_mapper().status, Status::Warn);
        fs::write(root.path().join("dev/net/tun"), "").unwrap();
        fs::write(root.path().join("dev/userfaultfd"), "").unwrap();
        fs::write(
            root.path().join("proc/misc"),
            "236 device-mapper\n 58 network_throughput\n",
        )
        .unwrap();
        assert_eq!(probe.tun().status, Status::Ok);
        assert_eq!(probe.userfaultfd().status, Status::Ok);
        assert_eq!(probe.device_mapper().status, Status::Ok);
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(20 << 30), "20.0 GiB");
    }
}
