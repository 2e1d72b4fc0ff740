//! The VM's KVM state as serde-able plain data: per-vCPU registers, MSRs, CPUID, LAPIC and
//! events, and the VM's irqchips, PIT and clock; saving and restoring it.
//!
//! Save state only while the vCPUs are paused ([`crate::RunningVm::save_state`] does that): a
//! parking vCPU first re-enters `KVM_RUN` with `immediate_exit` set, which completes an
//! in-flight port/MMIO exit without running guest code, so no instruction is replayed on
//! restore (see `vcpu`).
//!
//! Restore order follows Firecracker's: CPUID, MP state, regs, sregs, XSAVE, XCRs, debug regs,
//! LAPIC, MSRs, vCPU events — the LAPIC before the MSRs because KVM ignores a TSC-deadline
//! write while the LAPIC timer is not in TSC-deadline mode, and among the MSRs
//! `IA32_TSC` before `IA32_TSC_DEADLINE` because KVM stores the deadline relative to the current
//! TSC. The VM's clock is restored with its flags cleared: `KVM_SET_CLOCK` accepts only
//! `KVM_CLOCK_REALTIME`, and with it the guest's clock would jump by the downtime; without it
//! the guest continues from the snapshot's time (the agent sets the wall clock on restore).

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use kvm_ioctls::{VcpuFd, VmFd};

/// `IA32_TSC`.
#[cfg(test)]
const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: must be written after `IA32_TSC`.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
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

/// Why saved state could not be loaded into KVM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("KVM refused the saved {what}")]
    Write {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the saved {what} does not fit KVM's structure")]
    Shape { what: &'static str },
    #[error("KVM accepted only {written} of {wanted} saved MSRs (first refused: {refused:#x})")]
    PartialMsrs {
        written: usize,
        wanted: usize,
        refused: u32,
    },
    #[error(
        "the snapshot's TSC runs at {saved} kHz, this host's at {host} kHz, and KVM cannot scale it"
    )]
    TscFrequency { saved: u32, host: u32 },
}

fn write<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, RestoreError> {
    r.map_err(|source| RestoreError::Write { what, source })
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
    /// The guest TSC frequency in kHz (`KVM_GET_TSC_KHZ`), when KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
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
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Loads this state into a freshly created vCPU (see the module docs for the order).
    /// `tsc_scaling` says whether KVM can run the guest TSC at another frequency than the host's.
    pub fn restore(&self, fd: &VcpuFd, tsc_scaling: bool) -> Result<(), RestoreError> {
        if let Some(saved) = self.tsc_khz
            && let Ok(host) = fd.get_tsc_khz()
            && saved != host
        {
            if !tsc_scaling {
                return Err(RestoreError::TscFrequency { saved, host });
            }
            write("TSC frequency", fd.set_tsc_khz(saved))?;
        }
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| RestoreError::Shape { what: "CPUID" })?;
        write("CPUID", fd.set_cpuid2(&cpuid))?;
        write("MP state", fd.set_mp_state(self.mp_state))?;
        write("registers", fd.set_regs(&self.regs))?;
        write("special registers", fd.set_sregs(&self.sregs))?;
        let mut xsave = kvm_bindings::kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(RestoreError::Shape { what: "XSAVE area" });
        }
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `xsave` is a plain `kvm_xsave` without a trailing extension
        // (`extra` is empty), which is exactly the layout KVM_SET_XSAVE reads.
        write("XSAVE area", unsafe { fd.set_xsave(&xsave) })?;
        write("XCRs", fd.set_xcrs(&self.xcrs))?;
        write("debug registers", fd.set_debug_regs(&self.debugregs))?;
        write("LAPIC", fd.set_lapic(&self.lapic))?;
        write_msrs(fd, &self.msrs)?;
        write("vCPU events", fd.set_vcpu_events(&self.vcpu_events))?;
        Ok(())
    }
}

/// `msrs` in restore order: `IA32_TSC_DEADLINE` after everything else (so after `IA32_TSC`).
fn restore_order(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let (deadline, mut rest): (Vec<_>, Vec<_>) = msrs
        .iter()
        .copied()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    rest.extend(deadline);
    rest
}

/// Writes every saved MSR, in chunks KVM accepts; a refused MSR is an error (it was readable on
/// the same kind of host when saved).
fn write_msrs(fd: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<(), RestoreError> {
    let ordered = restore_order(msrs);
    for chunk in ordered.chunks(KVM_MAX_MSR_ENTRIES) {
        let list = Msrs::from_entries(chunk).map_err(|_| RestoreError::Shape { what: "MSRs" })?;
        let written = write("MSRs", fd.set_msrs(&list))?;
        if written != chunk.len() {
            return Err(RestoreError::PartialMsrs {
                written,
                wanted: chunk.len(),
                refused: chunk.get(written).map_or(0, |m| m.index),
            });
        }
    }
    Ok(())
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

    /// Loads the irqchips, PIT and clock into a freshly created VM (after its vCPUs are
    /// restored, as Firecracker does).
    pub fn restore(&self, fd: &VmFd) -> Result<(), RestoreError> {
        write("PIT", fd.set_pit2(&self.pit))?;
        let clock = kvm_clock_data {
            flags: 0,
            ..self.clock
        };
        write("clock", fd.set_clock(&clock))?;
        write("PIC master", fd.set_irqchip(&self.pic_master))?;
        write("PIC slave", fd.set_irqchip(&self.pic_slave))?;
        write("IOAPIC", fd.set_irqchip(&self.ioapic))?;
        Ok(())
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
            tsc_khz: Some(2_000_000),
        }
    }

    #[test]
    fn the_tsc_deadline_is_restored_after_the_tsc() {
        let entry = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let saved = [
            entry(MSR_IA32_TSC_DEADLINE),
            entry(0x174),
            entry(MSR_IA32_TSC),
            entry(0xc000_0080),
        ];
        let order: Vec<u32> = restore_order(&saved).iter().map(|m| m.index).collect();
        assert_eq!(
            order,
            [0x174, MSR_IA32_TSC, 0xc000_0080, MSR_IA32_TSC_DEADLINE]
        );
    }

    #[test]
    fn state_saved_before_tsc_khz_existed_still_loads() {
        let mut json = serde_json::to_value(vcpu_state()).unwrap();
        json.as_object_mut().unwrap().remove("tsc_khz");
        let back: VcpuState = serde_json::from_value(json).unwrap();
        assert_eq!(back.tsc_khz, None);
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
