//! The guest physical address map: where boot structures, the kernel, RAM and the MMIO gap sit.
//!
//! The low-memory layout follows Firecracker's (which follows the Linux x86 boot protocol): the
//! zero page, GDT/IDT, boot page tables and command line live below 1 MiB, the kernel is loaded
//! at 1 MiB, and a 768 MiB gap below 4 GiB holds virtio-mmio slots, the IOAPIC and the LAPIC.
//! RAM beyond the gap continues at 4 GiB.

/// Boot GDT (4 descriptors).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty, limit 0).
pub const BOOT_IDT_START: u64 = 0x520;
/// `boot_params`, "the zero page".
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (rsp/rbp) of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the identity map the kernel starts with.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory with 2 MiB pages covering the first 1 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: low RAM ends here, the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table (searched by the kernel in the EBDA).
pub const MPTABLE_START: u64 = EBDA_START;
/// End of base memory (640 KiB): the MP table must end below it.
pub const BASE_MEMORY_END: u64 = 0xa0000;
/// Where the kernel is loaded ("high memory").
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (no RAM between here and 4 GiB).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap; RAM continues here.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// KVM's three-page TSS region (needed on Intel), inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's one-page identity map for real mode (Intel), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// The IOAPIC's MMIO base (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// First virtio-mmio slot; slots are [`VIRTIO_MMIO_SLOT_SIZE`] apart.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio slot (the kernel's `virtio_mmio.device=4K@...`).
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// First GSI for virtio devices (0–4 are PIT, keyboard, cascade, COM2, COM1).
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Last GSI the IOAPIC has (24 pins).
pub const LAST_GSI: u32 = 23;
/// GSI of the serial console (COM1).
pub const SERIAL_GSI: u32 = 4;
/// COM1 port range.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Ports of a 16550 UART.
pub const SERIAL_PORT_LEN: u64 = 8;
/// i8042 data port (0x60) up to the command/status port (0x64).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports covered by the i8042: 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
