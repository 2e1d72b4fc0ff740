//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its vCPUs
//! (one processor entry each, APIC id = vCPU index), the IOAPIC and the ISA interrupt routing.
//!
//! Hand-written: there is no maintained crate for it (Firecracker and Cloud Hypervisor each carry
//! their own copy), and the format is a few fixed-size little-endian records. The routing mirrors
//! KVM's default GSI routing: ISA IRQ n → IOAPIC pin n for all 24 pins; LINT0 ExtINT, LINT1 NMI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{APIC_START, BASE_MEMORY_END, IOAPIC_START, LAST_GSI};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REVISION: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
#[cfg(test)]
const PROCESSOR_ENTRY_LEN: usize = 20;
#[cfg(test)]
const SHORT_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 model 1 stepping 0 — only informative; the kernel reads CPUID.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4);
/// FPU and APIC present.
const CPU_FEATURES: u32 = 1 | (1 << 9);

const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("an MP table describes 1 to 254 CPUs, not {0}")]
    CpuCount(u8),
    #[error("the MP table does not fit below 640 KiB")]
    TooLarge,
    #[error("could not write the MP table to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// Sum of all bytes, mod 256.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    bytes[at] = 0u8.wrapping_sub(checksum(bytes));
}

/// The IOAPIC's id: after the CPUs' APIC ids.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// The floating pointer followed by the configuration table, for a table placed at `base`.
pub fn build(base: u64, cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus == u8::MAX {
        return Err(MpTableError::CpuCount(cpus));
    }
    let config_addr =
        u32::try_from(base + FLOATING_POINTER_LEN as u64).map_err(|_| MpTableError::TooLarge)?;
    let ioapic = ioapic_id(cpus);

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    let ioapic_addr = u32::try_from(IOAPIC_START).map_err(|_| MpTableError::TooLarge)?;
    entries.extend_from_slice(&ioapic_addr.to_le_bytes());
    count += 1;
    for irq in 0..=u8::try_from(LAST_GSI).map_err(|_| MpTableError::TooLarge)? {
        // type, irq type, flags (conforming polarity/trigger), source bus, source irq,
        // destination IOAPIC, destination pin
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, IRQ_TYPE_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // LINT0 of every local APIC (0xff) is ExtINT, LINT1 NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len =
        u16::try_from(HEADER_LEN + entries.len()).map_err(|_| MpTableError::TooLarge)?;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, fixed below
    table.extend_from_slice(b"ROOST   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    let lapic_addr = u32::try_from(APIC_START).map_err(|_| MpTableError::TooLarge)?;
    table.extend_from_slice(&lapic_addr.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.extend_from_slice(&[0, 0]); // extended checksum, reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    fix_checksum(&mut table, 7);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(MPF_SIGNATURE);
    out.extend_from_slice(&config_addr.to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REVISION);
    out.push(0); // checksum, fixed below
    out.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    fix_checksum(&mut out, 10);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Builds the table for `cpus` vCPUs and writes it at `base`, which must leave it below
/// 640 KiB (the kernel searches the last KiB of base memory).
pub fn write(mem: &GuestMemoryMmap, base: u64, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(base, cpus)?;
    let end = base + u64::try_from(bytes.len()).map_err(|_| MpTableError::TooLarge)?;
    if end > BASE_MEMORY_END {
        return Err(MpTableError::TooLarge);
    }
    mem.write_slice(&bytes, GuestAddress(base))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MPTABLE_START;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in [1, 2, 16] {
            let bytes = build(MPTABLE_START, cpus).unwrap();
            let (mpf, table) = bytes.split_at(FLOATING_POINTER_LEN);
            assert_eq!(&mpf[..4], b"_MP_");
            assert_eq!(checksum(mpf), 0);
            assert_eq!(u64::from(u32_at(mpf, 4)), MPTABLE_START + 16);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(usize::from(u16_at(table, 4)), table.len());
            assert_eq!(checksum(table), 0);
            assert_eq!(u64::from(u32_at(table, 36)), APIC_START);
        }
    }

    /// Walks the entries the way the kernel's MP parser does.
    #[test]
    fn entries_list_every_cpu_the_ioapic_and_24_pins() {
        let cpus = 4;
        let bytes = build(MPTABLE_START, cpus).unwrap();
        let table = &bytes[FLOATING_POINTER_LEN..];
        let count = u16_at(table, 34);
        let mut at = HEADER_LEN;
        let (mut processors, mut bootstrap, mut ioapics, mut pins, mut lints) =
            (vec![], 0, 0, 0, 0);
        for _ in 0..count {
            match table[at] {
                ENTRY_PROCESSOR => {
                    processors.push(table[at + 1]);
                    assert_ne!(table[at + 3] & CPU_ENABLED, 0);
                    if table[at + 3] & CPU_BOOTSTRAP != 0 {
                        bootstrap += 1;
                    }
                    at += PROCESSOR_ENTRY_LEN;
                }
                ENTRY_BUS => {
                    assert_eq!(&table[at + 2..at + 8], b"ISA   ");
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_IOAPIC => {
                    assert_eq!(table[at + 1], ioapic_id(cpus));
                    assert_eq!(u64::from(u32_at(table, at + 4)), IOAPIC_START);
                    ioapics += 1;
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(table[at + 5], table[at + 7], "ISA IRQ n goes to pin n");
                    pins += 1;
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_LOCAL_INTERRUPT => {
                    lints += 1;
                    at += SHORT_ENTRY_LEN;
                }
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(at, table.len());
        assert_eq!(processors, vec![0, 1, 2, 3]);
        assert_eq!((bootstrap, ioapics, pins, lints), (1, 1, 24, 2));
    }

    #[test]
    fn sixteen_cpus_fit_in_the_ebda_and_zero_is_refused() {
        let len = build(MPTABLE_START, 16).unwrap().len() as u64;
        assert!(MPTABLE_START + len <= BASE_MEMORY_END);
        assert!(matches!(
            build(MPTABLE_START, 0),
            Err(MpTableError::CpuCount(0))
        ));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, MPTABLE_START, 16).unwrap();
        assert!(matches!(
            write(&mem, 0x9ff00, 16),
            Err(MpTableError::TooLarge)
        ));
    }
}
