//! x86-64 specifics: the CPU state a 64-bit Linux kernel expects at its entry point, CPUID
//! normalisation, and the MP table through which the guest finds its vCPUs and IOAPIC.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod mptable;
pub mod msrs;
pub mod paging;
pub mod regs;
