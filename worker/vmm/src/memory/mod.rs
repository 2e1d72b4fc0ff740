//! Guest RAM: the region layout around the MMIO gap and what backs it.
//!
//! Three backings, chosen by [`MemoryBackend`]:
//! - anonymous memory for a cold boot;
//! - a snapshot's base memory file mapped `MAP_PRIVATE` ([`mapped`]): clones of one snapshot
//!   share its page cache, and a guest write copies only that page;
//! - anonymous memory whose missing pages a userfaultfd page server fills ([`uffd`]).
//!
//! Saving memory into a snapshot is [`snapshot`]'s job; the chain format itself lives in the
//! `roost-pager` crate, which knows nothing of KVM. Chain page `i` is byte `i * PAGE_SIZE` of the
//! guest RAM regions laid end to end ("chain offsets"), so the MMIO gap takes no space.

pub mod mapped;
pub mod pagemap;
pub mod snapshot;

use std::path::PathBuf;
use std::time::Duration;

use roost_pager::server::{ClientError, PagerLink, RamRegion};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest page size this VMM snapshots in (the x86 base page).
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as the chain format stores it.
pub const PAGE_SIZE_U32: u32 = 4096;

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit this host's address space.
    #[error("guest memory size {0:#x} does not fit in this host's address space")]
    TooLarge(u64),
    /// mmap of the regions failed (usually: not enough address space or overcommit refused).
    #[error("could not map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// The page server did not take the VM's memory.
    #[error("could not hand guest memory to the page server at {socket}")]
    Pager {
        socket: PathBuf,
        #[source]
        source: ClientError,
    },
    /// A snapshot's memory could not be mapped.
    #[error("could not restore guest memory from the snapshot in {dir}")]
    Restore {
        dir: PathBuf,
        #[source]
        source: mapped::MappedError,
    },
}

/// What backs guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Fresh, zeroed, lazily-populated anonymous memory (cold boot).
    Anonymous,
    /// The memory chain in snapshot directory `dir`, its base file mapped `MAP_PRIVATE` and the
    /// newer generations' pages copied in. `header_sha256` must match the chain's header (from
    /// the snapshot's [`snapshot::MemoryManifest`]), so a state file never meets foreign memory.
    MapPrivate { dir: PathBuf, header_sha256: String },
    /// Anonymous memory registered with a userfaultfd that is handed to the `roost-pager serve`
    /// process listening at `socket`, which fills pages from the chain with header
    /// `header_sha256` as the guest touches them.
    Uffd {
        socket: PathBuf,
        header_sha256: String,
    },
}

/// How long the page server may take to accept the VM's memory.
const PAGER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the VMM process's own writes into guest RAM can be told apart from untouched pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory: every page the process ever touched is present.
    Anonymous,
    /// A private file mapping: pages written since the mapping are anonymous copies, the rest
    /// are still the file's page-cache pages.
    PrivateFile,
    /// Anonymous memory filled by a page server: a page not present may still hold data (in
    /// the chain); a present page may have been written.
    Uffd,
}

/// Guest RAM: the mapped regions plus what the snapshot code needs to know about them.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    backing: Backing,
    size: u64,
    /// `/proc/self/pagemap`, opened before seccomp; `None` makes every diff save every page.
    pagemap: Option<pagemap::Pagemap>,
    /// The page server link of a userfaultfd backend (kept for the VM's life).
    pager: Option<PagerLink>,
}

impl GuestRam {
    /// The regions, for devices, boot code and KVM (cloning it is cheap: regions are shared).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest RAM size in bytes (the chain length).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// With a userfaultfd backend: starts the watchdog that calls `on_lost` (with the reason)
    /// when the page server dies or fails, then, if the process is still alive after
    /// `grace`, exits it with `exit_code` (vCPU threads blocked in faults cannot be joined).
    /// Call from a thread without a seccomp filter. Returns false for other backends.
    pub fn watch_pager(
        &self,
        on_lost: impl FnOnce(String) + Send + 'static,
        grace: Duration,
        exit_code: i32,
    ) -> std::io::Result<bool> {
        match &self.pager {
            Some(link) => {
                link.watch(move |lost| on_lost(lost.message), Some((grace, exit_code)))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
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

/// [`regions`] with host-sized lengths.
fn host_regions(size: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    regions(size)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (start, len))
                .map_err(|_| MemoryError::TooLarge(size))
        })
        .collect()
}

/// Guest RAM of `size` bytes backed as `backend` says.
pub fn create(size: u64, backend: &MemoryBackend) -> Result<GuestRam, MemoryError> {
    match backend {
        MemoryBackend::Anonymous => Ok(GuestRam {
            memory: create_anonymous(size)?,
            backing: Backing::Anonymous,
            size,
            pagemap: open_pagemap(),
            pager: None,
        }),
        MemoryBackend::MapPrivate { dir, header_sha256 } => {
            let memory = mapped::map_chain(dir, header_sha256, &host_regions(size)?, size)
                .map_err(|source| MemoryError::Restore {
                    dir: dir.clone(),
                    source,
                })?;
            Ok(GuestRam {
                memory,
                backing: Backing::PrivateFile,
                size,
                pagemap: open_pagemap(),
                pager: None,
            })
        }
        MemoryBackend::Uffd {
            socket,
            header_sha256,
        } => {
            let memory = create_anonymous(size)?;
            let mut chain_offset = 0u64;
            let regions: Vec<RamRegion> = memory
                .iter()
                .map(|r| {
                    let region = RamRegion {
                        host: r.as_ptr(),
                        len: usize::try_from(r.len()).unwrap_or(usize::MAX),
                        chain_offset,
                    };
                    chain_offset += r.len();
                    region
                })
                .collect();
            let link = PagerLink::connect(
                socket,
                &regions,
                PAGE_SIZE_U32,
                header_sha256,
                PAGER_HANDSHAKE_TIMEOUT,
            )
            .map_err(|source| MemoryError::Pager {
                socket: socket.clone(),
                source,
            })?;
            Ok(GuestRam {
                memory,
                backing: Backing::Uffd,
                size,
                pagemap: open_pagemap(),
                pager: Some(link),
            })
        }
    }
}

fn open_pagemap() -> Option<pagemap::Pagemap> {
    pagemap::Pagemap::open()
        .inspect_err(|e| {
            tracing::warn!(error = %e, "no /proc/self/pagemap: diff snapshots will save every page");
        })
        .ok()
}

/// Anonymous, lazily-populated guest RAM of `size` bytes.
pub fn create_anonymous(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&host_regions(size)?).map_err(MemoryError::Map)
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
        let ram = create(64 << 20, &MemoryBackend::Anonymous).unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }
}

#[cfg(test)]
mod snapshot_tests;
