//! A copy-on-write overlay over a read-only base image: a sparse overlay file whose data area
//! mirrors the virtual disk cluster for cluster, plus an allocation bitmap saying which
//! clusters live in the overlay. Reads of unallocated clusters come from the base; writes
//! allocate (a partial write to an unallocated cluster first copies that cluster from the
//! base); a flush makes the data and then the map durable. The base is opened read-only and is
//! never written. See [`format`] for the on-disk layout and why clusters are 4 KiB.
//!
//! The overlay also records which clusters were written since the last disk snapshot, so a
//! pause saves only those ([`super::layer`]).

pub mod format;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fixedbitset::FixedBitSet;

pub use format::{CLUSTER_BYTES, CLUSTER_SIZE, Geometry, SlotError};

/// Why an overlay could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot open overlay file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} overlay file {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a {0}-byte base image is too large for an overlay")]
    TooLarge(u64),
    #[error("overlay file {path} is unusable: {reason}")]
    Corrupt {
        path: PathBuf,
        #[source]
        reason: SlotError,
    },
    #[error(
        "overlay file {path} is truncated: cluster {cluster} is allocated but the file ends at byte {len}"
    )]
    Truncated {
        path: PathBuf,
        cluster: u64,
        len: u64,
    },
}

/// An open overlay on top of its base image.
#[derive(Debug)]
pub struct Overlay {
    base: File,
    file: File,
    path: PathBuf,
    geometry: Geometry,
    /// Clusters whose data is in the overlay.
    allocated: FixedBitSet,
    /// Clusters written since the last disk snapshot (a subset of `allocated`).
    dirty: FixedBitSet,
    /// The in-memory map differs from the newest slot on disk.
    map_changed: bool,
    /// The slot holding the newest durable map.
    active_slot: usize,
    generation: u64,
    /// One cluster, for read-modify-write of partial writes.
    scratch: Vec<u8>,
}

/// `cluster` as a bit index (clusters are bounded by the bitmap, which fits in memory).
fn bit(cluster: u64) -> usize {
    usize::try_from(cluster).unwrap_or(usize::MAX)
}

/// Reads `buf.len()` bytes at `offset`, zero-filling whatever lies past the end of the file.
fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

impl Overlay {
    /// Opens the overlay at `path` over `base` (`base_len` bytes, opened read-only), creating
    /// it when the file is missing or empty. An existing overlay must have been made for a
    /// base of the same size and have a valid allocation map; otherwise it is refused.
    pub fn open(base: File, base_len: u64, path: &Path) -> Result<Self, OverlayError> {
        let geometry = Geometry::new(base_len).ok_or(OverlayError::TooLarge(base_len))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| OverlayError::Open {
                path: path.to_owned(),
                source,
            })?;
        let io_err = |what| {
            let path = path.to_owned();
            move |source| OverlayError::Io { what, path, source }
        };
        let len = file.metadata().map_err(io_err("stat"))?.len();
        let clusters = bit(geometry.clusters);
        let mut overlay = Self {
            base,
            file,
            path: path.to_owned(),
            geometry,
            allocated: FixedBitSet::with_capacity(clusters),
            dirty: FixedBitSet::with_capacity(clusters),
            map_changed: false,
            active_slot: 1,
            generation: 0,
            scratch: vec![0u8; CLUSTER_BYTES],
        };
        if len == 0 {
            // A new overlay: an empty map in slot 0, durable before the guest runs.
            overlay.map_changed = true;
            overlay.flush().map_err(io_err("initialise"))?;
            return Ok(overlay);
        }
        overlay.load_map(len)?;
        Ok(overlay)
    }

    /// Reads both slots, keeps the valid one with the highest generation, and checks that
    /// every allocated cluster lies inside the file.
    fn load_map(&mut self, file_len: u64) -> Result<(), OverlayError> {
        let mut best: Option<(usize, u64, FixedBitSet)> = None;
        let mut first_error = None;
        for slot in 0..2 {
            match self.read_slot(slot, file_len) {
                Ok((generation, map)) => {
                    if best.as_ref().is_none_or(|(_, g, _)| generation > *g) {
                        best = Some((slot, generation, map));
                    }
                }
                Err(OverlayError::Corrupt { reason, .. }) => {
                    first_error.get_or_insert(reason);
                }
                Err(other) => return Err(other),
            }
        }
        let Some((slot, generation, map)) = best else {
            return Err(OverlayError::Corrupt {
                path: self.path.clone(),
                reason: first_error.unwrap_or(SlotError::Truncated),
            });
        };
        if let Some(last) = map.ones().next_back() {
            let last = last as u64;
            // Identity-mapped data: the last allocated cluster must be inside the file.
            let needed = self.geometry.cluster_offset(last) + CLUSTER_SIZE;
            if needed > file_len {
                return Err(OverlayError::Truncated {
                    path: self.path.clone(),
                    cluster: last,
                    len: file_len,
                });
            }
        }
        self.allocated = map;
        self.active_slot = slot;
        self.generation = generation;
        Ok(())
    }

    fn read_slot(&self, slot: usize, file_len: u64) -> Result<(u64, FixedBitSet), OverlayError> {
        let corrupt = |reason| OverlayError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let offset = self.geometry.slot_offset(slot);
        let end = offset + format::HEADER_PAGE + self.geometry.bitmap_len;
        if end > file_len {
            return Err(corrupt(SlotError::Truncated));
        }
        let mut page = vec![0u8; bit(format::HEADER_PAGE)];
        let mut bitmap = vec![0u8; bit(self.geometry.bitmap_len)];
        let io_err = |source| OverlayError::Io {
            what: "read the allocation map of",
            path: self.path.clone(),
            source,
        };
        self.file.read_exact_at(&mut page, offset).map_err(io_err)?;
        self.file
            .read_exact_at(&mut bitmap, offset + format::HEADER_PAGE)
            .map_err(io_err)?;
        let header = format::decode_header(&page, &self.geometry).map_err(corrupt)?;
        format::check_bitmap(&header, &bitmap).map_err(corrupt)?;
        let blocks = bitmap
            .chunks_exact(8)
            .map(|word| {
                let mut b = [0u8; 8];
                b.copy_from_slice(word);
                bit(u64::from_le_bytes(b))
            })
            .collect::<Vec<_>>();
        let map = FixedBitSet::with_capacity_and_blocks(bit(self.geometry.clusters), blocks);
        // Bits past the last cluster would be a forged map: the checksum alone cannot tell.
        if map.ones().any(|c| c as u64 >= self.geometry.clusters) {
            return Err(corrupt(SlotError::Inconsistent));
        }
        Ok((header.generation, map))
    }

    /// The overlay file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that the file was renamed (a restored overlay moved into place).
    pub fn set_path(&mut self, path: &Path) {
        path.clone_into(&mut self.path);
    }

    /// The layout (virtual size, cluster count).
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Clusters held in the overlay.
    pub fn allocated(&self) -> &FixedBitSet {
        &self.allocated
    }

    /// Clusters written since the last [`Overlay::clear_dirty`].
    pub fn dirty(&self) -> &FixedBitSet {
        &self.dirty
    }

    /// Forgets which clusters were written (after a snapshot saved them).
    pub fn clear_dirty(&mut self) {
        self.dirty.clear();
    }

    /// Reads a whole cluster's current contents (overlay or base) into `buf`.
    pub fn read_cluster(&self, cluster: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.allocated.contains(bit(cluster)) {
            self.file
                .read_exact_at(buf, self.geometry.cluster_offset(cluster))
        } else {
            read_or_zero(&self.base, buf, cluster * CLUSTER_SIZE)
        }
    }

    /// Stores a whole cluster in the overlay (restoring a snapshot layer).
    pub fn write_cluster(&mut self, cluster: u64, buf: &[u8]) -> io::Result<()> {
        if cluster >= self.geometry.clusters || buf.len() as u64 != CLUSTER_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cluster {cluster} is outside the disk"),
            ));
        }
        self.file
            .write_all_at(buf, self.geometry.cluster_offset(cluster))?;
        self.allocated.insert(bit(cluster));
        self.map_changed = true;
        Ok(())
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset` (the caller checked the range):
    /// one `pread` per run of clusters from the same file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let first = pos / CLUSTER_SIZE;
            let in_overlay = self.allocated.contains(bit(first));
            let mut next = first + 1;
            while next * CLUSTER_SIZE < end && self.allocated.contains(bit(next)) == in_overlay {
                next += 1;
            }
            let run_end = end.min(next * CLUSTER_SIZE);
            let slice = &mut buf[bit(pos - offset)..bit(run_end - offset)];
            if in_overlay {
                self.file
                    .read_exact_at(slice, self.geometry.data_offset + pos)?;
            } else {
                read_or_zero(&self.base, slice, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `buf` to the virtual disk at `offset` (the caller checked the range). Partial
    /// clusters at either end that are not yet in the overlay are first copied from the base.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = offset / CLUSTER_SIZE;
        let last = (end - 1) / CLUSTER_SIZE;
        for cluster in [first, last] {
            let start = cluster * CLUSTER_SIZE;
            let partial = start < offset || start + CLUSTER_SIZE > end;
            if partial && !self.allocated.contains(bit(cluster)) {
                self.copy_up(cluster, buf, offset)?;
            }
        }
        self.file
            .write_all_at(buf, self.geometry.data_offset + offset)?;
        for cluster in first..=last {
            if !self.allocated.put(bit(cluster)) {
                self.map_changed = true;
            }
            self.dirty.insert(bit(cluster));
        }
        Ok(())
    }

    /// Copies `cluster` from the base into the overlay with the part of `buf` (which starts at
    /// disk offset `offset`) that falls inside it already applied.
    fn copy_up(&mut self, cluster: u64, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = cluster * CLUSTER_SIZE;
        read_or_zero(&self.base, &mut self.scratch, start)?;
        let end = offset + buf.len() as u64;
        let from = offset.max(start);
        let to = end.min(start + CLUSTER_SIZE);
        self.scratch[bit(from - start)..bit(to - start)]
            .copy_from_slice(&buf[bit(from - offset)..bit(to - offset)]);
        self.file
            .write_all_at(&self.scratch, self.geometry.cluster_offset(cluster))?;
        self.allocated.insert(bit(cluster));
        self.map_changed = true;
        Ok(())
    }

    /// Makes everything written so far durable: the data first, then (if it changed) the
    /// allocation map into the older slot with the next generation.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        if !self.map_changed {
            return Ok(());
        }
        let slot = 1 - self.active_slot;
        let generation = self.generation + 1;
        let mut bitmap = Vec::with_capacity(bit(self.geometry.bitmap_len));
        for word in self.allocated.as_slice() {
            bitmap.extend_from_slice(&(*word as u64).to_le_bytes());
        }
        bitmap.resize(bit(self.geometry.bitmap_len), 0);
        let mut record = format::encode_header(&self.geometry, generation, &bitmap);
        record.extend_from_slice(&bitmap);
        self.file
            .write_all_at(&record, self.geometry.slot_offset(slot))?;
        self.file.sync_data()?;
        self.active_slot = slot;
        self.generation = generation;
        self.map_changed = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
