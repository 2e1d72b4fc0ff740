//! Saving guest RAM into a snapshot directory, and choosing how a snapshot's RAM comes back.
//!
//! Called with the vCPUs paused. A full save writes every page that may be non-zero (untouched
//! anonymous pages are skipped without reading them; all-zero pages become holes). A diff save
//! writes only the pages changed since the parent snapshot: KVM's dirty log (guest writes) plus
//! the pages the VMM process itself may have written ([`super::pagemap`]). Chains deeper than
//! [`SaveOptions::max_depth`] are merged right after the diff is written.

use std::path::{Path, PathBuf};

use roost_pager::{Chain, ChainError, ChainWriter, WriteSummary, merge_if_deeper};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion};

use super::pagemap;
use super::{GuestRam, MemoryBackend, PAGE_SIZE};
use crate::vm::{Vm, VmError};

/// Pages read from guest RAM at a time.
const CHUNK_PAGES: usize = 256;

/// What the VM state file records about its memory: enough to refuse foreign or mismatched
/// memory files on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryManifest {
    /// Guest RAM bytes.
    pub size: u64,
    pub page_size: u32,
    /// Generations in the chain (1 after a full save or a merge).
    pub depth: u32,
    /// SHA-256 (hex) of `memory.hdr`.
    pub header_sha256: String,
    /// Pages this save wrote (statistics).
    pub pages_written: u64,
}

/// Full or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveKind<'a> {
    /// Every page.
    Full,
    /// Only pages changed since the snapshot in `parent` (a snapshot directory of this VM's
    /// latest full or diff save, or the snapshot this VM was restored from).
    Diff { parent: &'a Path },
}

/// Tuning of a save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveOptions {
    /// Chains deeper than this are merged into one generation after a diff (at least 1).
    pub max_depth: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            max_depth: roost_pager::DEFAULT_MAX_DEPTH,
        }
    }
}

/// How to restore a snapshot's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreChoice {
    /// Map the memory file `MAP_PRIVATE` (clones share the page cache).
    Map,
    /// Let the `roost-pager serve --snapshot DIR --socket SOCKET` process fill memory on
    /// demand (it must be listening before the VM is built).
    Uffd { socket: PathBuf },
}

/// Why guest memory could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("could not read KVM's dirty log")]
    DirtyLog(#[source] VmError),
    #[error("a diff snapshot needs KVM dirty logging: register guest memory with dirty logging on")]
    NoDirtyLog,
    #[error("could not open the parent snapshot's memory in {dir}")]
    Parent {
        dir: PathBuf,
        #[source]
        source: ChainError,
    },
    #[error("the parent snapshot has {parent} bytes of memory, this VM {vm}")]
    ParentSize { parent: u64, vm: u64 },
    #[error("could not write the memory chain")]
    Write(#[source] ChainError),
    #[error("could not merge the memory chain")]
    Merge(#[source] ChainError),
    #[error("could not read guest memory")]
    Read(#[source] GuestMemoryError),
    #[error("could not read /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
}

/// Saves guest RAM into `dir` (an existing, empty-of-memory-files snapshot directory).
pub fn save(
    ram: &GuestRam,
    vm: &Vm,
    dir: &Path,
    kind: SaveKind<'_>,
    options: &SaveOptions,
) -> Result<MemoryManifest, SaveError> {
    // Taking the log also resets it: the next diff is relative to this save.
    let dirty = vm.dirty_log(ram.memory()).map_err(SaveError::DirtyLog)?;
    save_with_dirty_log(ram, dirty.as_deref(), dir, kind, options)
}

/// [`save`] with KVM's dirty log already taken (`None` when dirty logging is off).
pub fn save_with_dirty_log(
    ram: &GuestRam,
    dirty: Option<&[u64]>,
    dir: &Path,
    kind: SaveKind<'_>,
    options: &SaveOptions,
) -> Result<MemoryManifest, SaveError> {
    let page_size = super::PAGE_SIZE_U32;
    let pages = ram.size() / PAGE_SIZE as u64;
    let (mut writer, dirty) = match kind {
        SaveKind::Full => (
            ChainWriter::full(dir, page_size, pages).map_err(SaveError::Write)?,
            None,
        ),
        SaveKind::Diff { parent } => {
            let dirty = dirty.ok_or(SaveError::NoDirtyLog)?;
            let chain = Chain::open(parent).map_err(|source| SaveError::Parent {
                dir: parent.to_owned(),
                source,
            })?;
            if chain.len_bytes() != ram.size() {
                return Err(SaveError::ParentSize {
                    parent: chain.len_bytes(),
                    vm: ram.size(),
                });
            }
            let writer = ChainWriter::diff(dir, &chain).map_err(SaveError::Write)?;
            (writer, Some(dirty))
        }
    };
    copy_pages(ram, &mut writer, dirty)?;
    let mut summary = writer.finish().map_err(SaveError::Write)?;
    let written = summary.pages_written;
    if let Some(merged) = merge_if_deeper(dir, options.max_depth).map_err(SaveError::Merge)? {
        summary = merged;
    }
    tracing::debug!(
        pages_written = written,
        zero_pages = summary.zero_pages,
        depth = summary.depth,
        "guest memory saved"
    );
    Ok(manifest(ram.size(), &summary, written))
}

fn manifest(size: u64, summary: &WriteSummary, written: u64) -> MemoryManifest {
    MemoryManifest {
        size,
        page_size: summary.page_size,
        depth: u32::try_from(summary.depth).unwrap_or(u32::MAX),
        header_sha256: summary.header_sha256.clone(),
        pages_written: written,
    }
}

/// The memory backend that restores the snapshot in `dir` described by `manifest`.
pub fn restore_backend(
    manifest: &MemoryManifest,
    dir: &Path,
    choice: &RestoreChoice,
) -> MemoryBackend {
    match choice {
        RestoreChoice::Map => MemoryBackend::MapPrivate {
            dir: dir.to_owned(),
            header_sha256: manifest.header_sha256.clone(),
        },
        RestoreChoice::Uffd { socket } => MemoryBackend::Uffd {
            socket: socket.clone(),
            header_sha256: manifest.header_sha256.clone(),
        },
    }
}

/// Puts every page that must be saved into `writer`: with `dirty` (a diff), the pages in the
/// KVM bitmap or possibly written by this process; without, every page that may be non-zero.
fn copy_pages(
    ram: &GuestRam,
    writer: &mut ChainWriter,
    dirty: Option<&[u64]>,
) -> Result<(), SaveError> {
    let pagemap = ram.pagemap.as_ref();
    let mut entries = Vec::with_capacity(CHUNK_PAGES);
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
    let mut first_page = 0u64;
    for region in ram.memory().iter() {
        let region_pages = usize::try_from(region.len() / PAGE_SIZE as u64).unwrap_or(0);
        let mut done = 0usize;
        while done < region_pages {
            let n = CHUNK_PAGES.min(region_pages - done);
            let host = region.as_ptr().wrapping_add(done * PAGE_SIZE);
            match pagemap {
                Some(pm) => pm
                    .entries(host, n, &mut entries)
                    .map_err(SaveError::Pagemap)?,
                None => {
                    entries.clear();
                    entries.resize(n, u64::MAX);
                }
            }
            let chunk_first = first_page + done as u64;
            let wanted = |i: usize| {
                let page = chunk_first + i as u64;
                let by_process = pagemap::maybe_written(entries[i], ram.backing());
                match dirty {
                    // A diff: the guest's writes plus whatever the VMM may have written.
                    Some(bits) => {
                        by_process
                            || usize::try_from(page / 64)
                                .ok()
                                .and_then(|w| bits.get(w))
                                .is_some_and(|w| w & (1 << (page % 64)) != 0)
                    }
                    // A full save: anonymous pages never touched are zero; file pages and pages
                    // a page server has yet to fill may hold data even when not present.
                    None => by_process || ram.backing() != super::Backing::Anonymous,
                }
            };
            if (0..n).any(wanted) {
                let addr = GuestAddress(region.start_addr().0 + (done * PAGE_SIZE) as u64);
                let chunk = &mut buf[..n * PAGE_SIZE];
                ram.memory()
                    .read_slice(chunk, addr)
                    .map_err(SaveError::Read)?;
                for i in (0..n).filter(|&i| wanted(i)) {
                    writer
                        .put_page(chunk_first + i as u64, &chunk[i * PAGE_SIZE..][..PAGE_SIZE])
                        .map_err(SaveError::Write)?;
                }
            }
            done += n;
        }
        first_page += region_pages as u64;
    }
    Ok(())
}
