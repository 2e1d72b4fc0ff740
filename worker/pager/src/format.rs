//! The chain header (`memory.hdr`): which generation holds each guest page.
//!
//! A memory snapshot is a chain of generations. Each generation's data file is a sparse raw image
//! of guest memory (page `i` at offset `i * page_size`) holding only the pages written in that
//! generation; everything else is a hole. The header of the newest snapshot maps every page to
//! the generation that holds its current contents, or to "zero" — so a page the guest zeroed is
//! recorded as zero even when an older generation holds data for it. Keeping data files raw
//! means the base generation can be mapped `MAP_PRIVATE` as guest RAM directly.
//!
//! Binary layout, little endian, all of it covered by the SHA-256 trailer:
//!
//! ```text
//! magic "ROOSTMEM" | version u32 | page_size u32 | pages u64 | generations u16
//! per generation: id u64 | name length u16 | name (UTF-8) | pages held u64
//! map: pages × u16       0 = zero page, k = generation k-1
//! crc: pages × u32       CRC-32 of the page's contents (0 for zero pages)
//! base_held: ceil(pages/8) bytes, bit i = the base generation's file holds data for page i
//! sha256 of everything above (32 bytes)
//! ```

use sha2::{Digest, Sha256};

/// File magic of a chain header.
pub const MAGIC: &[u8; 8] = b"ROOSTMEM";
/// The header format this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest header accepted: refuses absurd sizes before allocating (1 TiB of 4 KiB pages).
const MAX_PAGES: u64 = 1 << 28;
/// Longest generation file name.
const MAX_NAME: usize = 255;

/// Why a header could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a Roost memory header (bad magic)")]
    BadMagic,
    #[error(
        "memory header format version {0} is not supported (this build reads version {VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error("memory header is truncated")]
    Truncated,
    #[error("memory header checksum mismatch: the file is corrupted")]
    Checksum,
    #[error("memory header is inconsistent: {0}")]
    Invalid(&'static str),
}

/// One generation of the chain: a data file in the snapshot directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Random id, also part of the file name; ties a header to the files it was written with.
    pub id: u64,
    /// File name inside the snapshot directory (never a path).
    pub name: String,
    /// How many pages the file holds data for (statistics; the map is authoritative).
    pub pages_held: u64,
}

impl Generation {
    /// A new generation with a fresh random id.
    pub fn fresh() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes)?;
        let id = u64::from_le_bytes(bytes);
        Ok(Self {
            id,
            name: format!("memory-{id:016x}.pages"),
            pages_held: 0,
        })
    }
}

/// Where a page's current contents live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    /// The page is all zeros (never written, or zeroed by the guest).
    Zero,
    /// The page is held by this generation (index into [`Header::generations`]).
    Generation(u16),
}

/// The decoded chain header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub page_size: u32,
    pub generations: Vec<Generation>,
    /// Per page: 0 = zero, k = generation k-1.
    pub map: Vec<u16>,
    /// Per page: CRC-32 of the contents (0 for zero pages).
    pub crc: Vec<u32>,
    /// Pages for which the base generation's file holds data (to zero them on a mapped restore).
    pub base_held: Vec<u8>,
}

impl Header {
    /// An empty chain of `pages` zero pages.
    pub fn new(page_size: u32, pages: u64) -> Result<Self, FormatError> {
        if pages > MAX_PAGES {
            return Err(FormatError::Invalid("too many pages"));
        }
        let n = usize::try_from(pages).map_err(|_| FormatError::Invalid("too many pages"))?;
        Ok(Self {
            page_size,
            generations: Vec::new(),
            map: vec![0; n],
            crc: vec![0; n],
            base_held: vec![0; n.div_ceil(8)],
        })
    }

    pub fn pages(&self) -> u64 {
        self.map.len() as u64
    }

    /// Where page `index` lives. Panics if `index` is out of range.
    pub fn source(&self, index: usize) -> PageSource {
        match self.map[index] {
            0 => PageSource::Zero,
            k => PageSource::Generation(k - 1),
        }
    }

    /// Whether the base generation's file holds data for page `index`.
    pub fn base_holds(&self, index: usize) -> bool {
        self.base_held[index / 8] & (1 << (index % 8)) != 0
    }

    pub(crate) fn set_base_held(&mut self, index: usize) {
        self.base_held[index / 8] |= 1 << (index % 8);
    }

    /// Serialises the header with its checksum trailer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.map.len() * 6 + self.base_held.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.pages().to_le_bytes());
        let count = u16::try_from(self.generations.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        for g in &self.generations {
            out.extend_from_slice(&g.id.to_le_bytes());
            let name = g.name.as_bytes();
            let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(&g.pages_held.to_le_bytes());
        }
        for m in &self.map {
            out.extend_from_slice(&m.to_le_bytes());
        }
        for c in &self.crc {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out.extend_from_slice(&self.base_held);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Parses and checks a header produced by [`Header::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
                FormatError::Truncated
            } else {
                FormatError::BadMagic
            });
        }
        let mut r = Reader {
            bytes,
            at: MAGIC.len(),
        };
        let version = r.u32()?;
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        // Checksum before trusting any length field beyond the version.
        let body_len = bytes.len().checked_sub(32).ok_or(FormatError::Truncated)?;
        if body_len < r.at {
            return Err(FormatError::Truncated);
        }
        let page_size = r.u32()?;
        let pages = r.u64()?;
        if !page_size.is_power_of_two() || !(512..=(1 << 21)).contains(&page_size) {
            return Err(FormatError::Invalid("page size"));
        }
        if pages > MAX_PAGES {
            return Err(FormatError::Invalid("too many pages"));
        }
        let n = usize::try_from(pages).map_err(|_| FormatError::Invalid("too many pages"))?;
        let count = r.u16()?;
        let mut generations = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let id = r.u64()?;
            let len = usize::from(r.u16()?);
            if len == 0 || len > MAX_NAME {
                return Err(FormatError::Invalid("generation file name length"));
            }
            let name = std::str::from_utf8(r.take(len)?)
                .map_err(|_| FormatError::Invalid("generation file name is not UTF-8"))?
                .to_owned();
            if name.contains('/') || name == "." || name == ".." {
                return Err(FormatError::Invalid("generation file name is a path"));
            }
            let pages_held = r.u64()?;
            generations.push(Generation {
                id,
                name,
                pages_held,
            });
        }
        let expected =
            r.at.checked_add(n * 6 + n.div_ceil(8) + 32)
                .ok_or(FormatError::Truncated)?;
        if bytes.len() < expected {
            return Err(FormatError::Truncated);
        }
        if bytes.len() > expected {
            return Err(FormatError::Invalid("trailing bytes"));
        }
        let (body, trailer) = bytes.split_at(body_len);
        if Sha256::digest(body).as_slice() != trailer {
            return Err(FormatError::Checksum);
        }
        let map = (0..n).map(|_| r.u16()).collect::<Result<Vec<_>, _>>()?;
        if map.iter().any(|&m| usize::from(m) > generations.len()) {
            return Err(FormatError::Invalid("page mapped to a missing generation"));
        }
        let crc = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
        let base_held = r.take(n.div_ceil(8))?.to_vec();
        Ok(Self {
            page_size,
            generations,
            map,
            crc,
            base_held,
        })
    }
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(len).ok_or(FormatError::Truncated)?;
        let out = self.bytes.get(self.at..end).ok_or(FormatError::Truncated)?;
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::new(4096, 20).unwrap();
        h.generations.push(Generation::fresh().unwrap());
        h.generations.push(Generation::fresh().unwrap());
        h.map[3] = 1;
        h.crc[3] = 0xdead_beef;
        h.map[7] = 2;
        h.crc[7] = 42;
        h.set_base_held(3);
        h
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        let decoded = Header::decode(&h.encode()).unwrap();
        assert_eq!(decoded, h);
        assert_eq!(decoded.source(3), PageSource::Generation(0));
        assert_eq!(decoded.source(7), PageSource::Generation(1));
        assert_eq!(decoded.source(0), PageSource::Zero);
        assert!(decoded.base_holds(3));
        assert!(!decoded.base_holds(7));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            let err = Header::decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated | FormatError::Checksum),
                "length {len}: {err:?}"
            );
        }
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let bytes = sample().encode();
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(Header::decode(&bad).is_err(), "flip at {at} accepted");
        }
    }

    #[test]
    fn other_versions_and_magic_are_refused_by_name() {
        let mut bytes = sample().encode();
        bytes[8] = 9;
        assert_eq!(
            Header::decode(&bytes),
            Err(FormatError::UnsupportedVersion(9))
        );
        assert_eq!(
            Header::decode(b"NOTAHEADER and more"),
            Err(FormatError::BadMagic)
        );
    }

    #[test]
    fn a_map_entry_past_the_generations_is_refused() {
        let mut h = sample();
        h.map[0] = 3;
        assert_eq!(
            Header::decode(&h.encode()),
            Err(FormatError::Invalid("page mapped to a missing generation"))
        );
    }
}
