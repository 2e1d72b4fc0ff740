//! Guest RAM: the region layout around the MMIO gap and the anonymous mappings backing it.
//!
//! Memory creation lives here alone so that restoring a snapshot can later build the same
//! regions from a memory file mapped `MAP_PRIVATE` (vm-memory's `from_ranges_with_files`)
//! without touching the rest of the VMM.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit this host's address space.
    #[error("guest memory size {0:#x} does not fit in this host's address space")]
    TooLarge(u64),
    /// mmap of the regions failed (usually: not enough address space or overcommit refused).
    #[error("could not map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// The guest-physical RAM regions for `size` bytes: below the MMIO gap, then from 4 GiB on.
pub fn regions(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if size > low {
        regions.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    regions
}

/// Anonymous, lazily-populated guest RAM of `size` bytes.
pub fn create_anonymous(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = regions(size)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (start, len))
                .map_err(|_| MemoryError::TooLarge(size))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_region_below_the_gap() {
        assert_eq!(regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let size = 8u64 << 30;
        let r = regions(size);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1], (GuestAddress(1 << 32), size - MMIO_GAP_START));
        assert_eq!(r.iter().map(|(_, l)| l).sum::<u64>(), size);
    }

    #[test]
    fn anonymous_memory_is_readable_and_writable() {
        let mem = create_anonymous(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }
}
