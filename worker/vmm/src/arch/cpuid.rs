//! CPUID normalisation: start from what KVM supports on this host and make each vCPU describe
//! itself and the VM's topology consistently (one thread per core, all vCPUs in one package).
//!
//! Which leaves matter: leaf 1 (APIC id, logical-CPU count, HTT, the hypervisor bit — KVM's
//! supported list does not set it, and without it the guest finds no kvm-clock), leaves 0x4 and
//! 0xb/0x1f (Intel cache sharing and x2APIC topology), 0x8000_0008 and 0x8000_001e (AMD core
//! count and topology).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: the LAPIC timer has TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: HTT — the logical-processor count in EBX[23:16] is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xb/0x1f level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` CPUs (the x2APIC-id shift of the core level).
pub fn id_bits(count: u8) -> u32 {
    match count {
        0 | 1 => 0,
        n => u32::from(n - 1).ilog2() + 1,
    }
}

/// Advertises the TSC-deadline LAPIC timer. KVM emulates it with an in-kernel irqchip
/// (`KVM_CAP_TSC_DEADLINE_TIMER`) but does not list it in its supported CPUID; without it the
/// guest calibrates its LAPIC timer against the PIT at boot (slow, and each PIT tick is an
/// exit). QEMU and Firecracker set it the same way.
pub fn set_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Rewrites `cpuid` (KVM's supported list) for vCPU `index` of `count`; the APIC id is `index`.
pub fn normalise(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        normalise_entry(entry, index, count);
    }
}

fn normalise_entry(entry: &mut kvm_cpuid_entry2, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count32 = u32::from(count.max(1));
    match entry.function {
        0x1 => {
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count32 << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if count32 > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        // Only caches that exist (type != 0) carry topology.
        0x4 if entry.eax & 0x1f != 0 => {
            let level = (entry.eax >> 5) & 0x7;
            // L1/L2 are private to a core (one thread each); L3 is shared by the package.
            let sharing = if level >= 3 { count32 - 1 } else { 0 };
            entry.eax &= 0x0000_3fff;
            entry.eax |= (sharing & 0xfff) << 14;
            entry.eax |= ((count32 - 1) & 0x3f) << 26;
        }
        0xb | 0x1f => {
            let (shift, logical, level_type) = match entry.index {
                0 => (0, 1, LEVEL_TYPE_SMT),
                1 => (id_bits(count), count32, LEVEL_TYPE_CORE),
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = logical;
            entry.ecx = (level_type << 8) | (entry.index & 0xff);
            entry.edx = apic_id;
        }
        0x8000_0008 => {
            entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count32 - 1);
        }
        0x8000_001e => {
            entry.eax = apic_id;
            // Core id = vCPU index, one thread per core.
            entry.ebx = (entry.ebx & !0xffff) | apic_id;
            // One node, node id 0.
            entry.ecx = 0;
        }
        _ => {}
    }
}

/// Looks up `(function, index)`.
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn host_like() -> CpuId {
        CpuId::from_entries(&[
            leaf(0x1, 0, 0x00a2_0f12, 0x0080_0800, 0x7ed8_320b, 0x178b_fbff),
            // L1d (type 1, level 1), L3 (type 3, level 3), terminator.
            leaf(0x4, 0, 0x0000_0121, 0, 0, 0),
            leaf(0x4, 1, 0x0000_0163, 0, 0, 0),
            leaf(0x4, 2, 0, 0, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0xb, 1, 4, 16, 0x201, 7),
            leaf(0xb, 2, 0, 0, 2, 7),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x0000_700f, 0),
            leaf(0x8000_001e, 0, 9, 0x0000_0105, 0x0000_0301, 0),
            leaf(0x4000_0001, 0, 0x0100_0000, 0, 0, 0),
        ])
        .unwrap()
    }

    #[test]
    fn leaf1_describes_this_vcpu_and_sets_the_hypervisor_bit() {
        let mut cpuid = host_like();
        normalise(&mut cpuid, 3, 4);
        let l1 = find(&cpuid, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical CPUs");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn tsc_deadline_is_added_to_leaf1_only() {
        let mut cpuid = host_like();
        set_tsc_deadline(&mut cpuid);
        assert_ne!(find(&cpuid, 1, 0).unwrap().ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(
            find(&cpuid, 0xb, 0).unwrap().ecx & LEAF1_ECX_TSC_DEADLINE,
            0
        );
    }

    #[test]
    fn single_vcpu_clears_htt() {
        let mut cpuid = host_like();
        normalise(&mut cpuid, 0, 1);
        let l1 = find(&cpuid, 1, 0).unwrap();
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
        let core = find(&cpuid, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx), (0, 1));
    }

    #[test]
    fn extended_topology_is_one_thread_per_core() {
        let mut cpuid = host_like();
        normalise(&mut cpuid, 5, 6);
        let smt = find(&cpuid, 0xb, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = find(&cpuid, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = find(&cpuid, 0xb, 2).unwrap();
        assert_eq!((end.eax, end.ebx, end.ecx >> 8, end.edx), (0, 0, 0, 5));
    }

    #[test]
    fn cache_and_amd_leaves_agree_with_the_count() {
        let mut cpuid = host_like();
        normalise(&mut cpuid, 2, 8);
        let l1d = find(&cpuid, 0x4, 0).unwrap();
        assert_eq!(l1d.eax >> 26, 7, "cores per package - 1");
        assert_eq!((l1d.eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!(l1d.eax & 0x3fff, 0x121, "cache type/level kept");
        let l3 = find(&cpuid, 0x4, 1).unwrap();
        assert_eq!((l3.eax >> 14) & 0xfff, 7, "L3 shared by all");
        assert_eq!(find(&cpuid, 0x4, 2).unwrap().eax, 0, "terminator untouched");
        let amd = find(&cpuid, 0x8000_0008, 0).unwrap();
        assert_eq!(amd.ecx & 0xff, 7);
        assert_eq!((amd.ecx >> 12) & 0xf, 3);
        let topo = find(&cpuid, 0x8000_001e, 0).unwrap();
        assert_eq!((topo.eax, topo.ebx & 0xffff, topo.ecx), (2, 2, 0));
        assert_eq!(find(&cpuid, 0x4000_0001, 0).unwrap().eax, 0x0100_0000);
    }

    #[test]
    fn id_bits_cover_the_count() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 16].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 4]
        );
    }
}
