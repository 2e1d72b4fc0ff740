//! The identity-mapped page tables the 64-bit entry point needs: the first 1 GiB mapped with
//! 2 MiB pages (the kernel builds its own tables right after entry).

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{PDE_START, PDPTE_START, PML4_START};

/// Present | writable.
const TABLE_FLAGS: u64 = 0x3;
/// Present | writable | page size (2 MiB).
const LARGE_PAGE_FLAGS: u64 = 0x83;

/// The three tables as (guest address, entries) — only non-zero entries are listed.
pub fn identity_tables() -> Vec<(u64, Vec<u64>)> {
    vec![
        (PML4_START, vec![PDPTE_START | TABLE_FLAGS]),
        (PDPTE_START, vec![PDE_START | TABLE_FLAGS]),
        (
            PDE_START,
            (0..512u64).map(|i| (i << 21) | LARGE_PAGE_FLAGS).collect(),
        ),
    ]
}

/// Writes the tables; returns the value for CR3.
pub fn write_identity_tables(mem: &GuestMemoryMmap) -> Result<u64, GuestMemoryError> {
    for (table, entries) in identity_tables() {
        for (i, entry) in (0u64..).zip(entries) {
            mem.write_obj(entry, GuestAddress(table + i * 8))?;
        }
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(mem: &GuestMemoryMmap, cr3: u64, virt: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((virt >> 39) & 0x1ff) * 8))
            .unwrap();
        let pdpt = pml4e & !0xfff;
        let pdpte: u64 = mem
            .read_obj(GuestAddress(pdpt + ((virt >> 30) & 0x1ff) * 8))
            .unwrap();
        let pd = pdpte & !0xfff;
        let pde: u64 = mem
            .read_obj(GuestAddress(pd + ((virt >> 21) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(
            pde & LARGE_PAGE_FLAGS,
            LARGE_PAGE_FLAGS,
            "not a present 2 MiB page"
        );
        (pde & !0x1f_ffff & !(1 << 63)) | (virt & 0x1f_ffff)
    }

    #[test]
    fn first_gigabyte_is_identity_mapped() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        for virt in [0, 0x1000, 0x10_0000, 0x123_4567, (1 << 30) - 1] {
            assert_eq!(translate(&mem, cr3, virt), virt);
        }
    }
}
