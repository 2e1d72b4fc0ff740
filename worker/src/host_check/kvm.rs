//! Is `/dev/kvm` able to run microVM guests?
//!
//! A device that answers the KVM API is not enough: some hosts back `/dev/kvm` with PVM, a
//! pagetable-based nested hypervisor (`kvm_pvm`) that cannot run stock guest kernels (they boot
//! ~100× slower and then stop with emulation failures). That case is recognised by its module
//! and sent to the host VM, where a real `kvm_amd` runs.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{Check, Status};

/// The only KVM API version that has ever existed (`KVM_GET_API_VERSION`).
pub const KVM_API_VERSION: i32 = 12;

const KVMIO: u8 = 0xAE;
nix::ioctl_none!(kvm_get_api_version, KVMIO, 0x00);

/// What opening `/dev/kvm` showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmDevice {
    Missing,
    NoAccess(String),
    NotKvm(String),
    ApiVersion(i32),
}

/// Which kernel module provides KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmBackend {
    /// `kvm_pvm`: cannot run stock guest kernels.
    Pvm,
    Intel,
    Amd,
    Unknown,
}

/// Opens the KVM device at `path` and asks its API version.
pub fn kvm_device_state(path: &Path) -> KvmDevice {
    // std opens with O_CLOEXEC, so no VMM child inherits this descriptor.
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return KvmDevice::Missing,
        Err(e) => return KvmDevice::NoAccess(e.to_string()),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an integer; the fd is
    // open for the duration of the call.
    match unsafe { kvm_get_api_version(file.as_raw_fd()) } {
        Ok(version) => KvmDevice::ApiVersion(version),
        Err(e) => KvmDevice::NotKvm(e.to_string()),
    }
}

const HOST_VM_HINT: &str = "run KVM work inside the host VM: `roost hostvm run -- <command>` (QEMU TCG with emulated SVM gives a real KVM)";

/// Decides whether KVM is usable from what the device and the loaded modules showed.
pub fn check_kvm(device: &KvmDevice, backend: KvmBackend) -> Check {
    let fail = |finding: String, rec: &str| Check::new("kvm", Status::Fail, finding, rec);
    match device {
        KvmDevice::Missing => fail(
            "no /dev/kvm: KVM is not usable".into(),
            &format!("enable virtualization and load kvm_intel/kvm_amd, or {HOST_VM_HINT}"),
        ),
        KvmDevice::NoAccess(e) => fail(
            format!("/dev/kvm cannot be opened ({e}): KVM is not usable by this user"),
            "run as root or add the user to the `kvm` group",
        ),
        KvmDevice::NotKvm(e) => fail(
            format!("/dev/kvm does not answer KVM_GET_API_VERSION ({e}): KVM is not usable"),
            HOST_VM_HINT,
        ),
        KvmDevice::ApiVersion(v) if *v != KVM_API_VERSION => fail(
            format!("/dev/kvm reports API version {v}, expected {KVM_API_VERSION}: KVM is not usable"),
            HOST_VM_HINT,
        ),
        KvmDevice::ApiVersion(_) => match backend {
            KvmBackend::Pvm => fail(
                "/dev/kvm is backed by kvm_pvm (PVM nested hypervisor), which cannot run stock guest kernels: KVM is not usable".into(),
                HOST_VM_HINT,
            ),
            KvmBackend::Intel | KvmBackend::Amd => Check::new(
                "kvm",
                Status::Ok,
                format!("/dev/kvm usable (kvm_{})", if backend == KvmBackend::Intel { "intel" } else { "amd" }),
                "none: microVMs run natively",
            ),
            KvmBackend::Unknown => Check::new(
                "kvm",
                Status::Warn,
                "/dev/kvm answers, but neither kvm_intel nor kvm_amd is loaded: the backend is unknown",
                format!("if guests fail to boot, {HOST_VM_HINT}"),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_api_version_is_refused() {
        let check = check_kvm(&KvmDevice::ApiVersion(11), KvmBackend::Intel);
        assert_eq!(check.status, Status::Fail);
        assert!(check.finding.contains("API version 11"));
    }

    #[test]
    fn unknown_backend_is_a_warning() {
        let check = check_kvm(&KvmDevice::ApiVersion(KVM_API_VERSION), KvmBackend::Unknown);
        assert_eq!(check.status, Status::Warn);
    }

    #[test]
    fn no_access_names_the_fix() {
        let check = check_kvm(
            &KvmDevice::NoAccess("Permission denied".into()),
            KvmBackend::Amd,
        );
        assert_eq!(check.status, Status::Fail);
        assert!(check.recommendation.contains("kvm"));
    }

    #[test]
    fn a_regular_file_is_not_a_kvm_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvm");
        std::fs::write(&path, "").unwrap();
        assert!(matches!(kvm_device_state(&path), KvmDevice::NotKvm(_)));
        assert_eq!(
            kvm_device_state(&dir.path().join("absent")),
            KvmDevice::Missing
        );
    }
}
