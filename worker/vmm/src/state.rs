//! The VM's state as serde-able plain data, for the snapshot work that builds on it: per-vCPU
//! registers, MSRs, CPUID, LAPIC and events, and the VM's irqchips, PIT and clock.
//!
//! Only saving is implemented here; restoring (and file framing, versioning, memory) belongs to
//! the snapshot issue. Save state only while the vCPUs are paused ([`crate::RunningVm::save_state`]
//! does that): a vCPU kicked out of `KVM_RUN` has completed any in-flight port/MMIO exit
//! (KVM finishes it before noticing the signal), so no instruction is replayed on restore.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Why state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("could not read {what}")]
    Read {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("could not build the MSR list")]
    MsrList,
    #[error("vCPU {index} did not report its state: {detail}")]
    Vcpu { index: u8, detail: String },
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(std::time::Duration),
}

fn read<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Read { what, source })
}

/// One vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area (FPU, SSE, AVX), `kvm_xsave.region`.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads vCPU `index`'s state; `msr_indices` is KVM's MSR index list.
    pub fn save(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid: CpuId = read("CPUID", fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
        Ok(Self {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            msrs: read_msrs(fd, msr_indices)?,
            regs: read("registers", fd.get_regs())?,
            sregs: read("special registers", fd.get_sregs())?,
            xsave: read("XSAVE area", fd.get_xsave())?.region.to_vec(),
            xcrs: read("XCRs", fd.get_xcrs())?,
            debugregs: read("debug registers", fd.get_debug_regs())?,
            lapic: read("LAPIC", fd.get_lapic())?,
            mp_state: read("MP state", fd.get_mp_state())?,
            vcpu_events: read("vCPU events", fd.get_vcpu_events())?,
        })
    }
}

/// Reads every readable MSR of `indices`. `KVM_GET_MSRS` stops at the first index it cannot
/// read and returns how many it did: skip that one and go on.
pub fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|_| StateError::MsrList)?;
        let read_count = read("MSRs", fd.get_msrs(&mut msrs))?;
        out.extend_from_slice(&msrs.as_slice()[..read_count]);
        let skip = if read_count < chunk.len() {
            read_count + 1
        } else {
            read_count
        };
        rest = &rest[skip.min(rest.len())..];
    }
    Ok(out)
}

/// The VM-wide devices KVM emulates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    pub fn save(fd: &VmFd) -> Result<Self, StateError> {
        let chip = |chip_id| -> Result<kvm_irqchip, StateError> {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            read("irqchip", fd.get_irqchip(&mut chip))?;
            Ok(chip)
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: read("PIT", fd.get_pit2())?,
            clock: read("clock", fd.get_clock())?,
        })
    }
}

/// The whole machine's CPU and interrupt-controller state (devices and memory come with the
/// snapshot issue).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu_state() -> VcpuState {
        VcpuState {
            index: 1,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x0a20f12,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            }],
            regs: kvm_regs {
                rip: 0x100_0000,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: vec![7; 1024],
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            mp_state: kvm_mp_state::default(),
            vcpu_events: kvm_vcpu_events::default(),
        }
    }

    #[test]
    fn vcpu_state_round_trips_through_serde() {
        let state = vcpu_state();
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs.rip, 0x100_0000);
        assert_eq!(back.msrs[0].data, 12345);
        assert_eq!(back.cpuid[0].eax, 0x0a20f12);
        assert_eq!(back.xsave, vec![7; 1024]);
    }

    #[test]
    fn machine_state_round_trips_through_serde() {
        let state = MachineState {
            vcpus: vec![vcpu_state()],
            vm: VmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip {
                    chip_id: 1,
                    ..Default::default()
                },
                ioapic: kvm_irqchip::default(),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data {
                    clock: 42,
                    ..Default::default()
                },
            },
        };
        let json = serde_json::to_vec(&state).unwrap();
        let back: MachineState = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.vm.clock.clock, 42);
        assert_eq!(back.vm.pic_slave.chip_id, 1);
        assert_eq!(back.vcpus.len(), 1);
    }
}
