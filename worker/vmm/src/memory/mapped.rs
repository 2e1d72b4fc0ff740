//! Restoring guest RAM by mapping a snapshot's memory `MAP_PRIVATE`.
//!
//! The chain's base generation is a raw (sparse) image of guest RAM, so each RAM region maps the
//! base file at its chain offset: nothing is read up front, clones of one snapshot share the
//! file's page cache, and the first guest write to a page copies just that page. Pages that newer
//! generations hold are then copied in (checksums verified), and pages the base holds but a newer
//! generation zeroed are cleared — so a chain of any depth restores exactly, and a merged (or
//! full) snapshot costs no copying at all.

use std::fs::File;
use std::path::Path;

use roost_pager::{Chain, ChainError};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryError, GuestMemoryMmap, GuestRegionCollectionError,
    GuestRegionMmap,
};

use super::PAGE_SIZE;

/// Why a snapshot's memory could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MappedError {
    #[error("could not open the memory chain")]
    Chain(#[from] ChainError),
    #[error(
        "the memory header's SHA-256 is {actual}, the VM state expects {expected}: the memory files do not belong to this snapshot"
    )]
    HeaderMismatch { expected: String, actual: String },
    #[error("the memory chain holds {chain} bytes, the VM has {vm} bytes of RAM")]
    SizeMismatch { chain: u64, vm: u64 },
    #[error("the memory chain uses {0}-byte pages; this VMM needs {PAGE_SIZE}")]
    PageSize(usize),
    #[error("could not open the base memory file")]
    OpenBase(#[source] std::io::Error),
    #[error("could not map the base memory file")]
    Map(#[source] MmapRegionError),
    #[error("mapped regions were refused")]
    Regions(#[source] GuestRegionCollectionError),
    #[error("chain offset {0:#x} is outside guest RAM")]
    Offset(u64),
    #[error("could not copy a newer generation's page into guest RAM")]
    Copy(#[source] GuestMemoryError),
}

/// Maps the chain in `dir` as guest RAM laid out as `regions` (total `size` bytes).
pub fn map_chain(
    dir: &Path,
    header_sha256: &str,
    regions: &[(GuestAddress, usize)],
    size: u64,
) -> Result<GuestMemoryMmap, MappedError> {
    let chain = Chain::open(dir)?;
    if chain.header_sha256() != header_sha256 {
        return Err(MappedError::HeaderMismatch {
            expected: header_sha256.to_owned(),
            actual: chain.header_sha256().to_owned(),
        });
    }
    if chain.len_bytes() != size {
        return Err(MappedError::SizeMismatch {
            chain: chain.len_bytes(),
            vm: size,
        });
    }
    if chain.page_size() != PAGE_SIZE {
        return Err(MappedError::PageSize(chain.page_size()));
    }
    let memory = match chain.generation_path(0) {
        Some(base) => map_base(&base, regions)?,
        None => GuestMemoryMmap::from_regions(
            regions
                .iter()
                .map(|&(addr, len)| {
                    let region = MmapRegionBuilder::new(len)
                        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                        .with_mmap_flags(
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        )
                        .build()
                        .map_err(MappedError::Map)?;
                    GuestRegionMmap::new(region, addr).ok_or(MappedError::Offset(addr.0))
                })
                .collect::<Result<Vec<_>, _>>()?,
        )
        .map_err(MappedError::Regions)?,
    };
    overlay_newer_generations(&chain, &memory, regions)?;
    Ok(memory)
}

/// Maps each region of the base file `MAP_PRIVATE` at its chain offset.
fn map_base(
    base: &Path,
    regions: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MappedError> {
    let file = File::open(base).map_err(MappedError::OpenBase)?;
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(regions.len());
    for &(addr, len) in regions {
        let fd = file.try_clone().map_err(MappedError::OpenBase)?;
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(MappedError::Map)?;
        out.push(GuestRegionMmap::new(region, addr).ok_or(MappedError::Offset(addr.0))?);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(out).map_err(MappedError::Regions)
}

/// Copies in the pages newer generations hold and clears base pages that were zeroed later.
fn overlay_newer_generations(
    chain: &Chain,
    memory: &GuestMemoryMmap,
    regions: &[(GuestAddress, usize)],
) -> Result<(), MappedError> {
    let header = chain.header();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut copied = 0u64;
    for (i, &m) in header.map.iter().enumerate() {
        let rewrite = match m {
            0 => header.base_holds(i),
            1 => false,
            _ => true,
        };
        if !rewrite {
            continue;
        }
        let index = i as u64;
        chain.read_page(index, &mut page)?;
        let offset = index * PAGE_SIZE as u64;
        let addr = guest_address(regions, offset).ok_or(MappedError::Offset(offset))?;
        memory.write_slice(&page, addr).map_err(MappedError::Copy)?;
        copied += 1;
    }
    tracing::debug!(
        depth = chain.depth(),
        pages_copied = copied,
        "guest memory mapped from the snapshot"
    );
    Ok(())
}

/// The guest address of chain offset `offset` for RAM laid out as `regions`.
pub fn guest_address(regions: &[(GuestAddress, usize)], offset: u64) -> Option<GuestAddress> {
    let mut start = 0u64;
    for &(addr, len) in regions {
        let len = len as u64;
        if offset < start + len {
            return addr.0.checked_add(offset - start).map(GuestAddress);
        }
        start += len;
    }
    None
}
