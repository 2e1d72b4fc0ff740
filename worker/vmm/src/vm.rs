//! The KVM VM: its fd, the in-kernel irqchip and PIT, guest memory slots, and the CPUID KVM
//! supports on this host (the starting point for every vCPU's CPUID).

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("could not open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a capability this VMM needs: {0}")]
    MissingCapability(&'static str),
    #[error("could not set the TSS or identity-map address")]
    SetTss(#[source] kvm_ioctls::Error),
    #[error("could not create the in-kernel irqchip")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("could not create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("could not read the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("could not read KVM's MSR index list")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("could not register guest memory slot {slot} with KVM")]
    SetMemory {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A created VM, ready for memory, devices and vCPUs.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    supported_cpuid: CpuId,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with an in-kernel irqchip and PIT.
    pub fn new() -> Result<Self, VmError> {
        Self::with_kvm(Kvm::new().map_err(VmError::OpenKvm)?)
    }

    /// Creates the VM on an already open `/dev/kvm`.
    pub fn with_kvm(kvm: Kvm) -> Result<Self, VmError> {
        use kvm_ioctls::Cap;
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Pit2, "PIT2"),
            (Cap::UserMemory, "user memory"),
            (Cap::ImmediateExit, "immediate exit"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(usize::try_from(KVM_TSS_ADDRESS).unwrap_or(usize::MAX))
            .map_err(VmError::SetTss)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetTss)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            crate::arch::cpuid::set_tsc_deadline(&mut supported_cpuid);
        }
        Ok(Self {
            kvm,
            fd,
            supported_cpuid,
        })
    }

    /// Maps every region of `mem` into the guest, one memory slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let host_addr = region.as_ptr() as u64;
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host_addr,
                flags: 0,
            };
            // SAFETY: the host range is a live mapping owned by `mem`, which the VMM keeps alive
            // (shared with every device) until the VM fd is closed; slots do not overlap because
            // vm-memory refuses overlapping regions.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(|source| VmError::SetMemory { slot, source })?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// KVM's supported CPUID on this host plus what KVM emulates for this VM (TSC-deadline
    /// timer), before per-vCPU normalisation.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }
}
