//! The boot GDT (flat 64-bit code, data and TSS descriptors) and the KVM segment registers
//! derived from it, as the Linux 64-bit boot protocol expects.

use kvm_bindings::kvm_segment;

/// Descriptor flags: 64-bit code, present, ring 0, execute/read, accessed, 4 KiB granularity.
const CODE_FLAGS: u16 = 0xa09b;
/// Data: present, ring 0, read/write, accessed, 32-bit default size, 4 KiB granularity.
const DATA_FLAGS: u16 = 0xc093;
/// 64-bit TSS, busy, present.
const TSS_FLAGS: u16 = 0x808b;

/// GDT index of the code segment (selector 0x08).
pub const CODE_INDEX: u16 = 1;
/// GDT index of the data segment (selector 0x10).
pub const DATA_INDEX: u16 = 2;
/// GDT index of the TSS (selector 0x18).
pub const TSS_INDEX: u16 = 3;

/// Packs one segment descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The four boot descriptors: null, code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(CODE_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

fn bits(entry: u64, shift: u32, mask: u64) -> u8 {
    u8::try_from((entry >> shift) & mask).unwrap_or(0)
}

/// The KVM segment register that loading descriptor `entry` at GDT `index` would produce.
pub fn segment_from_entry(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let granularity = bits(entry, 55, 1);
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bits(entry, 47, 1);
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index * 8,
        type_: bits(entry, 40, 0xf),
        present,
        dpl: bits(entry, 45, 3),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g: granularity,
        avl: bits(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_linux_boot_layout() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn code_segment_is_64_bit_flat() {
        let cs = segment_from_entry(boot_gdt()[1], CODE_INDEX);
        assert_eq!(cs.selector, 0x08);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.g), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = segment_from_entry(boot_gdt()[2], DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x10, 0x3, 1, 0));
        let tss = segment_from_entry(boot_gdt()[3], TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
        let null = segment_from_entry(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let entry = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = segment_from_entry(entry, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
    }
}
