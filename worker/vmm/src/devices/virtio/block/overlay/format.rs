//! On-disk layout of an overlay file and the checks that refuse a damaged one.
//!
//! ```text
//! offset 0            slot A: header page (4 KiB) + allocation bitmap (rounded up to 4 KiB)
//! offset slot_len     slot B: same layout
//! offset 2*slot_len   data area: cluster i of the virtual disk at data_offset + i * CLUSTER_SIZE
//! ```
//!
//! The data area is identity-mapped and the file is sparse, so an unallocated cluster costs no
//! space and consecutive clusters stay contiguous (one `pread` serves a run). The allocation map
//! is written to the two slots alternately, each with a generation number and SHA-256 checksums
//! of the header and the bitmap: a map write torn by a crash leaves the other slot valid, and
//! opening picks the valid slot with the highest generation. A file with no valid slot is
//! refused with the reason found in slot A.
//!
//! Header (little-endian): magic `ROOSTCOW`, version u32, cluster size u32, virtual size u64,
//! clusters u64, generation u64, bitmap length u64, bitmap SHA-256 (32 bytes), then the SHA-256
//! of all preceding header bytes (32 bytes).

use sha2::{Digest, Sha256};

/// Identifies an overlay file.
pub const MAGIC: [u8; 8] = *b"ROOSTCOW";
/// The only format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Copy-on-write granularity: 4 KiB, the guest's page and ext4 block size, so the guest's
/// writes almost always cover whole clusters (no read-modify-write of the base) and a diff
/// snapshot carries no more than the guest changed. The bitmap costs 32 KiB per GiB of disk.
pub const CLUSTER_SIZE: u64 = CLUSTER_SIZE_U32 as u64;
/// [`CLUSTER_SIZE`] for buffer lengths.
pub const CLUSTER_BYTES: usize = CLUSTER_SIZE_U32 as usize;
/// [`CLUSTER_SIZE`] as stored in the header.
const CLUSTER_SIZE_U32: u32 = 4096;
/// Size of the header page at the start of each slot.
pub const HEADER_PAGE: u64 = 4096;
/// Bytes of the header that carry fields (the rest of the page is zero).
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 8 + 8 + 32 + 32;

/// Where things are in an overlay for a virtual disk of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size of the virtual disk (the base image's size), bytes.
    pub virtual_size: u64,
    /// Number of clusters covering it (the last may extend past the end).
    pub clusters: u64,
    /// Bytes of the allocation bitmap.
    pub bitmap_len: u64,
    /// Bytes of one slot (header page + bitmap, rounded up to 4 KiB).
    pub slot_len: u64,
    /// Offset of cluster 0 in the file.
    pub data_offset: u64,
}

impl Geometry {
    /// The layout for a virtual disk of `virtual_size` bytes; `None` if it cannot be addressed.
    pub fn new(virtual_size: u64) -> Option<Self> {
        let clusters = virtual_size.div_ceil(CLUSTER_SIZE);
        let bitmap_len = clusters.div_ceil(64).checked_mul(8)?;
        let slot_len = HEADER_PAGE.checked_add(bitmap_len.checked_next_multiple_of(4096)?)?;
        let data_offset = slot_len.checked_mul(2)?;
        // The whole data area must be addressable.
        data_offset.checked_add(clusters.checked_mul(CLUSTER_SIZE)?)?;
        Some(Self {
            virtual_size,
            clusters,
            bitmap_len,
            slot_len,
            data_offset,
        })
    }

    /// File offset of slot `index` (0 or 1).
    pub fn slot_offset(&self, index: usize) -> u64 {
        if index == 0 { 0 } else { self.slot_len }
    }

    /// File offset of `cluster`'s data.
    pub fn cluster_offset(&self, cluster: u64) -> u64 {
        self.data_offset + cluster * CLUSTER_SIZE
    }
}

/// Why a slot (or the whole overlay) is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("not a Roost overlay (bad magic)")]
    BadMagic,
    #[error("overlay format version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("the header checksum does not match (corrupted header)")]
    HeaderChecksum,
    #[error("cluster size {0} is not supported (expected {CLUSTER_SIZE})")]
    ClusterSize(u32),
    #[error(
        "the overlay was made for a {found}-byte base image, but the base image is {expected} bytes"
    )]
    VirtualSize { found: u64, expected: u64 },
    #[error("the header's cluster count or bitmap length does not match its virtual size")]
    Inconsistent,
    #[error("the allocation map is truncated (the file ends inside it)")]
    Truncated,
    #[error("the allocation map checksum does not match (corrupted map)")]
    BitmapChecksum,
}

/// A decoded, checked slot header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub bitmap_sha256: [u8; 32],
}

/// Encodes the header page for `geometry` with this generation and bitmap.
pub fn encode_header(geometry: &Geometry, generation: u64, bitmap: &[u8]) -> Vec<u8> {
    let mut page = Vec::with_capacity(usize::try_from(HEADER_PAGE).unwrap_or(4096));
    page.extend_from_slice(&MAGIC);
    page.extend_from_slice(&VERSION.to_le_bytes());
    page.extend_from_slice(&CLUSTER_SIZE_U32.to_le_bytes());
    page.extend_from_slice(&geometry.virtual_size.to_le_bytes());
    page.extend_from_slice(&geometry.clusters.to_le_bytes());
    page.extend_from_slice(&generation.to_le_bytes());
    page.extend_from_slice(&geometry.bitmap_len.to_le_bytes());
    page.extend_from_slice(&Sha256::digest(bitmap));
    let header_sum = Sha256::digest(&page);
    page.extend_from_slice(&header_sum);
    debug_assert_eq!(page.len(), HEADER_LEN);
    page.resize(usize::try_from(HEADER_PAGE).unwrap_or(4096), 0);
    page
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes and checks a header page against the geometry the base image implies.
pub fn decode_header(page: &[u8], geometry: &Geometry) -> Result<Header, SlotError> {
    if page.len() < HEADER_LEN {
        return Err(SlotError::Truncated);
    }
    if page[..8] != MAGIC {
        return Err(SlotError::BadMagic);
    }
    let version = u32_at(page, 8);
    if version != VERSION {
        return Err(SlotError::Version(version));
    }
    let sum_at = HEADER_LEN - 32;
    if Sha256::digest(&page[..sum_at]).as_slice() != &page[sum_at..HEADER_LEN] {
        return Err(SlotError::HeaderChecksum);
    }
    let cluster_size = u32_at(page, 12);
    if u64::from(cluster_size) != CLUSTER_SIZE {
        return Err(SlotError::ClusterSize(cluster_size));
    }
    let virtual_size = u64_at(page, 16);
    if virtual_size != geometry.virtual_size {
        return Err(SlotError::VirtualSize {
            found: virtual_size,
            expected: geometry.virtual_size,
        });
    }
    if u64_at(page, 24) != geometry.clusters || u64_at(page, 40) != geometry.bitmap_len {
        return Err(SlotError::Inconsistent);
    }
    let mut bitmap_sha256 = [0u8; 32];
    bitmap_sha256.copy_from_slice(&page[48..80]);
    Ok(Header {
        generation: u64_at(page, 32),
        bitmap_sha256,
    })
}

/// Checks a slot's bitmap bytes against its header.
pub fn check_bitmap(header: &Header, bitmap: &[u8]) -> Result<(), SlotError> {
    if Sha256::digest(bitmap).as_slice() == header.bitmap_sha256 {
        Ok(())
    } else {
        Err(SlotError::BitmapChecksum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_small_and_odd_sizes() {
        let g = Geometry::new(4096 * 3 + 512).unwrap();
        assert_eq!(g.clusters, 4);
        assert_eq!(g.bitmap_len, 8);
        assert_eq!(g.slot_len, 8192);
        assert_eq!(g.data_offset, 16384);
        assert_eq!(g.cluster_offset(2), 16384 + 8192);
        let big = Geometry::new(1 << 30).unwrap();
        assert_eq!(big.bitmap_len, 32 << 10, "32 KiB of map per GiB");
        assert!(Geometry::new(u64::MAX).is_none());
    }

    #[test]
    fn header_round_trip_and_every_refusal() {
        let g = Geometry::new(1 << 20).unwrap();
        let bitmap = vec![0xa5u8; usize::try_from(g.bitmap_len).unwrap()];
        let page = encode_header(&g, 7, &bitmap);
        let header = decode_header(&page, &g).unwrap();
        assert_eq!(header.generation, 7);
        check_bitmap(&header, &bitmap).unwrap();
        let mut other = bitmap.clone();
        other[3] ^= 1;
        assert_eq!(
            check_bitmap(&header, &other),
            Err(SlotError::BitmapChecksum)
        );

        let mut bad = page.clone();
        bad[0] = b'X';
        assert_eq!(decode_header(&bad, &g), Err(SlotError::BadMagic));
        let mut bad = page.clone();
        bad[8] = 9;
        assert_eq!(decode_header(&bad, &g), Err(SlotError::Version(9)));
        let mut bad = page.clone();
        bad[33] ^= 0xff;
        assert_eq!(decode_header(&bad, &g), Err(SlotError::HeaderChecksum));
        assert_eq!(decode_header(&page[..40], &g), Err(SlotError::Truncated));
        let g2 = Geometry::new(2 << 20).unwrap();
        let err = decode_header(&page, &g2).unwrap_err();
        assert!(err.to_string().contains("1048576-byte base image"), "{err}");
    }
}
