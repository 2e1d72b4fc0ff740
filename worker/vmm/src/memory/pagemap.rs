//! Which guest pages this process itself has written, from `/proc/self/pagemap`.
//!
//! KVM's dirty log only sees writes the guest makes through its page tables. Writes the VMM
//! makes into guest RAM from its own threads — virtio used rings, received packets, block reads
//! landing in the guest's page cache — never appear there, so a diff built from KVM's log alone
//! would silently lose them. The kernel's page table state tells us conservatively which pages
//! the process may have written:
//! - in a private file mapping (a `MAP_PRIVATE` restore), a page that has been written is an
//!   anonymous copy, while an unwritten one is still the file's page-cache page;
//! - in anonymous memory, a page that was never touched is not present at all.
//!
//! So a diff adds every page that is anonymous-and-present (or swapped) in a private file
//! mapping, and every present page of anonymous memory. That is exact for the common
//! restore → run → pause cycle and a safe superset otherwise (never a lost page). See
//! `docs/memory-snapshots.md`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{Backing, PAGE_SIZE};

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE_OR_SHARED: u64 = 1 << 61;

/// An open `/proc/self/pagemap` (opened while building the VM, before seccomp).
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// The pagemap entries of the `pages` pages starting at host address `addr`.
    pub fn entries(&self, addr: *const u8, pages: usize, out: &mut Vec<u64>) -> io::Result<()> {
        out.clear();
        out.resize(pages, 0);
        let offset = (addr as u64 / PAGE_SIZE as u64) * 8;
        // SAFETY: u64 has no invalid bit patterns and `out` owns `pages` initialised u64s, so
        // viewing them as bytes for the read is sound.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), pages * 8) };
        self.file.read_exact_at(bytes, offset)
    }
}

/// Whether a page with pagemap `entry` may hold data this process (or the guest) wrote since
/// memory of kind `backing` was created.
pub fn maybe_written(entry: u64, backing: Backing) -> bool {
    match backing {
        Backing::Anonymous | Backing::Uffd => entry & (PRESENT | SWAPPED) != 0,
        Backing::PrivateFile => {
            entry & SWAPPED != 0 || (entry & PRESENT != 0 && entry & FILE_OR_SHARED == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_anonymous_pages_are_present_and_untouched_ones_are_not() {
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
            vm_memory::GuestAddress(0),
            16 * PAGE_SIZE,
        )])
        .unwrap();
        use vm_memory::{Bytes, GuestMemoryBackend};
        mem.write_obj(7u8, vm_memory::GuestAddress(3 * PAGE_SIZE as u64))
            .unwrap();
        let region = mem.iter().next().unwrap();
        let pm = Pagemap::open().unwrap();
        let mut entries = Vec::new();
        pm.entries(region.as_ptr(), 16, &mut entries).unwrap();
        let written: Vec<usize> = (0..16)
            .filter(|&i| maybe_written(entries[i], Backing::Anonymous))
            .collect();
        assert_eq!(written, vec![3]);
    }
}
