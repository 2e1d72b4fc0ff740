//! General, segment/control and FPU registers of a vCPU at the kernel's 64-bit entry point.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt::{self, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::paging;
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// rflags bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;
/// x87 control word after FNINIT.
const FPU_FCW: u16 = 0x37f;
/// MXCSR reset value: all SIMD exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// General registers: entry point, boot stack, `rsi` = the zero page (Linux boot protocol).
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The FPU after reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// Writes the boot GDT and an empty IDT to guest memory (shared by all vCPUs).
pub fn write_descriptor_tables(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    for (i, entry) in (0u64..).zip(gdt::boot_gdt()) {
        mem.write_obj(entry, GuestAddress(BOOT_GDT_START + i * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
}

/// Long mode with paging on, flat segments from the boot GDT and the identity page tables.
/// Starts from the vCPU's current `sregs` (KVM fills in fields we leave alone, such as the APIC
/// base).
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let table = gdt::boot_gdt();
    let code = gdt::segment_from_entry(table[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = gdt::segment_from_entry(table[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = gdt::segment_from_entry(table[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&table) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = crate::layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Writes everything in guest memory the boot `sregs` refer to.
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    write_descriptor_tables(mem)?;
    paging::write_identity_tables(mem).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_registers_follow_the_boot_protocol() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
    }

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let sregs = boot_sregs(kvm_sregs::default());
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.cr3, crate::layout::PML4_START);
        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.gdt.limit, 31);
    }

    #[test]
    fn descriptor_tables_land_in_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, gdt::boot_gdt()[1]);
        assert_eq!(boot_fpu().mxcsr, MXCSR_DEFAULT);
    }
}
