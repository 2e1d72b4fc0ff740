//! Which kernel modules the host VM carries, and their dependency closure.
//!
//! The closure is computed on this machine with `modprobe --show-depends` against the
//! extracted kernel package, so only the needed `.ko` files are copied; `depmod` then indexes
//! the copy and busybox `modprobe` inside the host VM loads each module after its dependencies.
//! The kernel's own on-demand loading (`request_module`, e.g. when `/dev/net/tun` is opened)
//! also works inside, because `modules.alias` is there and `/sbin/modprobe` exists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Modules the host VM must carry, each with why.
pub const CARRIED: &[(&str, &str)] = &[
    ("virtio_pci", "virtio devices of the host VM"),
    ("virtio_console", "the stdout/stderr/control ports"),
    ("virtio_blk", "built images attached as disks"),
    ("virtio_net", "user networking to this machine"),
    ("virtio_rng", "entropy, so getrandom never blocks"),
    ("kvm_amd", "a real /dev/kvm on emulated SVM"),
    ("tun", "tap devices for guest networking"),
    ("veth", "network namespace plumbing"),
    ("bridge", "bridged guest networks"),
    ("loop", "loop devices over image files"),
    ("overlay", "overlay filesystems"),
    ("dm_mod", "device-mapper"),
    ("dm_snapshot", "copy-on-write disks"),
    ("nf_tables", "firewalling and NAT"),
    ("nft_nat", "NAT expressions"),
    ("nft_chain_nat", "NAT chains"),
    ("nft_masq", "masquerading egress"),
    ("nft_ct", "connection tracking matches"),
    (
        "nft_reject_ipv4",
        "refused sandbox connections fail at once",
    ),
    ("iptable_nat", "NAT for iptables users"),
    ("vhost_net", "QEMU baselines with vhost networking"),
    ("vhost_vsock", "QEMU baselines with vsock"),
    ("vsock_loopback", "vsock inside the host VM"),
];

/// Modules `/init` loads before anything else: without them there is no output channel.
pub const EARLY: &[&str] = &["virtio_pci", "virtio_console"];

/// Modules `/init` loads next, before the command runs. The rest of [`CARRIED`] loads on first
/// use: the kernel asks `/sbin/modprobe` when a device node (`/dev/net/tun`, `/dev/loop-control`,
/// `/dev/mapper/control`, `/dev/vhost-*`, created ahead by `/init` from `modules.devname`), a
/// link type (`veth`, `bridge`), a filesystem (`overlay`), a device-mapper target or an
/// nftables family is first used; or load them with `modprobe NAME`. Loading all of them at
/// boot cost ~3 s under TCG.
pub const EAGER: &[&str] = &["virtio_blk", "virtio_net", "virtio_rng", "kvm_amd"];

/// One step of `modprobe --show-depends` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A module file to load (path as printed, absolute).
    Insmod(PathBuf),
    /// A module compiled into the kernel: nothing to copy.
    Builtin(String),
}

/// Parses `modprobe --show-depends` output.
pub fn parse_show_depends(output: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("insmod"), Some(path)) if path.starts_with('/') => {
                steps.push(Step::Insmod(PathBuf::from(path)));
            }
            (Some("builtin"), Some(name)) => steps.push(Step::Builtin(name.to_owned())),
            // Options set in modprobe.d on this machine; the module itself is what matters.
            (Some("options"), _) => {}
            _ => return Err(format!("unexpected line `{line}`")),
        }
    }
    Ok(steps)
}

/// The union of module files over several closures, as paths relative to `modules_dir`, in
/// first-seen order without duplicates.
pub fn closure_files(closures: &[Vec<Step>], modules_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    for step in closures.iter().flatten() {
        if let Step::Insmod(path) = step {
            let relative = path
                .strip_prefix(modules_dir)
                .map_err(|_| format!("{} is outside {}", path.display(), modules_dir.display()))?;
            if seen.insert(relative.to_owned()) {
                files.push(relative.to_owned());
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_AMD: &str = "insmod /x/lib/modules/6.1.0-56-cloud-amd64/kernel/virt/lib/irqbypass.ko \n\
insmod /x/lib/modules/6.1.0-56-cloud-amd64/kernel/arch/x86/kvm/kvm.ko \n\
insmod /x/lib/modules/6.1.0-56-cloud-amd64/kernel/arch/x86/kvm/kvm-amd.ko nested=1\n";

    #[test]
    fn parses_insmod_and_builtin_lines() {
        let steps = parse_show_depends(&format!("{KVM_AMD}builtin ext4\n\n")).unwrap();
        assert_eq!(steps.len(), 4);
        assert_eq!(
            steps[2],
            Step::Insmod(
                "/x/lib/modules/6.1.0-56-cloud-amd64/kernel/arch/x86/kvm/kvm-amd.ko".into()
            )
        );
        assert_eq!(steps[3], Step::Builtin("ext4".into()));
    }

    #[test]
    fn rejects_unknown_output() {
        let err = parse_show_depends("modprobe: FATAL: Module nope not found").unwrap_err();
        assert!(err.contains("FATAL"), "{err}");
        assert!(parse_show_depends("insmod relative.ko").is_err());
    }

    #[test]
    fn closure_is_deduplicated_in_dependency_order() {
        let dir = Path::new("/x/lib/modules/6.1.0-56-cloud-amd64");
        let kvm = parse_show_depends(KVM_AMD).unwrap();
        let tun_and_kvm = parse_show_depends(&format!(
            "insmod {0}/kernel/drivers/net/tun.ko\ninsmod {0}/kernel/arch/x86/kvm/kvm.ko\n",
            dir.display()
        ))
        .unwrap();
        let files = closure_files(&[kvm, tun_and_kvm], dir).unwrap();
        let files: Vec<_> = files.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            files,
            [
                "kernel/virt/lib/irqbypass.ko",
                "kernel/arch/x86/kvm/kvm.ko",
                "kernel/arch/x86/kvm/kvm-amd.ko",
                "kernel/drivers/net/tun.ko"
            ]
        );
        let outside = parse_show_depends("insmod /elsewhere/a.ko").unwrap();
        assert!(closure_files(&[outside], dir).is_err());
    }

    #[test]
    fn early_and_eager_modules_are_carried() {
        for early in EARLY.iter().chain(EAGER) {
            assert!(CARRIED.iter().any(|(name, _)| name == early), "{early}");
        }
    }
}
