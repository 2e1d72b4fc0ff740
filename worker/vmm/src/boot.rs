//! Loading the guest kernel: the ELF `vmlinux` at 1 MiB (linux-loader), the command line, and
//! the zero page (`boot_params` with the e820 memory map) written by linux-loader's
//! configurator — the Linux 64-bit boot protocol without a bootloader.

use std::fs::File;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    ZERO_PAGE_START,
};

/// `boot_flag` magic.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined bootloader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Minimum kernel alignment (16 MiB).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// Why the kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("could not open the kernel {path}")]
    OpenKernel {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not load the kernel as an uncompressed ELF vmlinux (a bzImage will not do)")]
    LoadKernel(#[source] linux_loader::loader::Error),
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("could not write the kernel command line to guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("the guest memory map needs more e820 entries than boot_params holds")]
    TooManyE820Entries,
    #[error("could not write boot_params to guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
}

/// Builds a command line, refusing one longer than the kernel accepts.
pub fn cmdline(text: &str) -> Result<Cmdline, BootError> {
    Cmdline::try_from(text, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)
}

/// Loads `kernel` into `mem`; returns the 64-bit entry point.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<u64, BootError> {
    let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::LoadKernel)?;
    Ok(loaded.kernel_load.0)
}

/// The e820 map for `mem_size` bytes of RAM laid out by [`crate::memory::regions`]: low RAM up
/// to the EBDA, then from 1 MiB to the MMIO gap (or the end), then above 4 GiB.
pub fn e820_entries(mem_size: u64) -> Vec<boot_e820_entry> {
    let ram = |addr: u64, size: u64| boot_e820_entry {
        addr,
        size,
        r#type: E820_RAM,
    };
    let mut entries = vec![ram(0, EBDA_START)];
    let low_end = mem_size.min(MMIO_GAP_START);
    entries.push(ram(HIMEM_START, low_end - HIMEM_START));
    if mem_size > MMIO_GAP_START {
        entries.push(ram(MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    entries
}

/// The zero page for a kernel whose command line is `cmdline_len` bytes (without NUL).
pub fn boot_params_for(mem_size: u64, cmdline_len: usize) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr =
        u32::try_from(CMDLINE_START).map_err(|_| BootError::TooManyE820Entries)?;
    params.hdr.cmdline_size = u32::try_from(cmdline_len)
        .map_err(|_| BootError::Cmdline(linux_loader::cmdline::Error::TooLarge))?;
    let entries = e820_entries(mem_size);
    if entries.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries);
    }
    params.e820_entries = u8::try_from(entries.len()).map_err(|_| BootError::TooManyE820Entries)?;
    params.e820_table[..entries.len()].copy_from_slice(&entries);
    Ok(params)
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &Cmdline,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::WriteCmdline)?;
    let len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();
    let params = boot_params_for(mem_size, len)?;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::WriteBootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn e820_skips_the_ebda_the_legacy_hole_and_the_mmio_gap() {
        let small = e820_entries(256 << 20);
        assert_eq!(small.len(), 2);
        assert_eq!((small[0].addr, small[0].size), (0, EBDA_START));
        assert_eq!(
            (small[1].addr, small[1].size),
            (HIMEM_START, (256 << 20) - HIMEM_START)
        );
        let big = e820_entries(8 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!(big[1].addr + big[1].size, MMIO_GAP_START);
        assert_eq!(
            (big[2].addr, big[2].size),
            (1 << 32, (8 << 30) - MMIO_GAP_START)
        );
        assert!(big.iter().all(|e| e.r#type == E820_RAM));
    }

    #[test]
    fn zero_page_carries_magic_cmdline_and_e820() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let line = cmdline("console=ttyS0 reboot=t").unwrap();
        write_boot_params(&mem, 64 << 20, &line).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(params.hdr.type_of_loader, KERNEL_LOADER_OTHER);
        let cmd_line_ptr = params.hdr.cmd_line_ptr;
        assert_eq!(u64::from(cmd_line_ptr), CMDLINE_START);
        assert_eq!({ params.hdr.cmdline_size }, 22);
        assert_eq!(params.e820_entries, 2);
        let mut text = [0u8; 23];
        mem.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0 reboot=t\0");
    }

    #[test]
    fn an_overlong_cmdline_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(cmdline(&long), Err(BootError::Cmdline(_))));
    }

    #[test]
    fn a_non_elf_kernel_is_refused_clearly() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, b"MZ not an ELF file at all, just bytes").unwrap();
        std::io::Seek::rewind(&mut file).unwrap();
        let err = load_kernel(&mem, &mut file).unwrap_err();
        assert!(err.to_string().contains("uncompressed ELF"), "{err}");
    }
}
