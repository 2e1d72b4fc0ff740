//! The KVM VM: its fd, the in-kernel irqchip and PIT, guest memory slots, and the CPUID KVM
//! supports on this host (the starting point for every vCPU's CPUID).

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
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
    #[error("could not read KVM's dirty log of memory slot {slot}")]
    DirtyLog {
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
    /// Whether guest memory was registered with `KVM_MEM_LOG_DIRTY_PAGES`.
    dirty_logging: AtomicBool,
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
            dirty_logging: AtomicBool::new(false),
        })
    }

    /// Maps every region of `mem` into the guest, one memory slot each, without dirty logging.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        self.register_memory_with(mem, false)
    }

    /// Maps every region of `mem` into the guest, one memory slot each (slot = region index).
    /// With `dirty_logging`, KVM records every page the guest writes (needed for diff
    /// snapshots; it costs one write-protection fault per page after each [`Vm::dirty_log`]).
    pub fn register_memory_with(
        &self,
        mem: &GuestMemoryMmap,
        dirty_logging: bool,
    ) -> Result<(), VmError> {
        let flags = if dirty_logging {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let host_addr = region.as_ptr() as u64;
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host_addr,
                flags,
            };
            // SAFETY: the host range is a live mapping owned by `mem`, which the VMM keeps alive
            // (shared with every device) until the VM fd is closed; slots do not overlap because
            // vm-memory refuses overlapping regions.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(|source| VmError::SetMemory { slot, source })?;
        }
        self.dirty_logging.store(dirty_logging, Ordering::Relaxed);
        Ok(())
    }

    /// Whether guest memory was registered with dirty logging.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Ordering::Relaxed)
    }

    /// The pages the guest wrote since registration or the previous call, as a bitmap over
    /// `mem`'s regions laid end to end (bit `i` of word `i / 64` = page `i`), and resets KVM's
    /// log. `None` when memory was registered without dirty logging. Call with the vCPUs paused
    /// for a consistent snapshot.
    pub fn dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Option<Vec<u64>>, VmError> {
        if !self.dirty_logging() {
            return Ok(None);
        }
        let page = crate::memory::PAGE_SIZE as u64;
        let total_pages: u64 = mem.iter().map(|r| r.len() / page).sum();
        let words = usize::try_from(total_pages.div_ceil(64)).unwrap_or(usize::MAX);
        let mut out = vec![0u64; words];
        let mut first = 0u64;
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let bitmap = self
                .fd
                .get_dirty_log(slot, len)
                .map_err(|source| VmError::DirtyLog { slot, source })?;
            let pages = region.len() / page;
            for (w, word) in (0u64..).zip(bitmap) {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let p = w * 64 + bit;
                    let i = first + p;
                    let word = usize::try_from(i / 64).ok().and_then(|w| out.get_mut(w));
                    if let (true, Some(word)) = (p < pages, word) {
                        *word |= 1 << (i % 64);
                    }
                }
            }
            first += pages;
        }
        Ok(Some(out))
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
