//! Writing one generation of a memory chain: a full snapshot (every non-zero page) or a diff on
//! top of a parent chain (only the pages given; the rest keep the parent's mapping).
//!
//! A diff snapshot directory is self-contained: the parent's generation files are hard-linked
//! into it (copied if the directories are on different file systems), so deleting the parent
//! never breaks a child. Generation files are never modified once their header is written.
//! All-zero pages are never written: they become holes and map to "zero", which is also how a
//! page the guest zeroed since the parent comes back zero on restore.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::chain::{Chain, ChainError, HEADER_FILE};
use crate::format::{Generation, Header};

/// Contiguous pages are gathered into writes of at most this many bytes.
const MAX_RUN_BYTES: usize = 1 << 20;

/// What a finished write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    /// Pages written into the new generation's file.
    pub pages_written: u64,
    /// Pages given that were all zeros (recorded as zero, nothing written).
    pub zero_pages: u64,
    /// Generations in the chain after this write.
    pub depth: usize,
    /// Pages in the chain.
    pub pages: u64,
    pub page_size: u32,
    /// SHA-256 of the header written, hex (ties a VM state file to this memory).
    pub header_sha256: String,
}

/// Writes one new generation into a snapshot directory.
#[derive(Debug)]
pub struct ChainWriter {
    dir: PathBuf,
    header: Header,
    generation: u16,
    path: PathBuf,
    file: File,
    run_start: u64,
    run: Vec<u8>,
    pages_written: u64,
    zero_pages: u64,
}

impl ChainWriter {
    /// Starts a full snapshot of `pages` pages of `page_size` bytes in `dir`: pages never
    /// given are zero.
    pub fn full(dir: &Path, page_size: u32, pages: u64) -> Result<Self, ChainError> {
        let header = Header::new(page_size, pages).map_err(|source| ChainError::Format {
            path: dir.join(HEADER_FILE),
            source,
        })?;
        Self::start(dir, header)
    }

    /// Starts a diff snapshot in `dir` on top of `parent`: pages never given keep the parent's
    /// contents. Links the parent's generation files into `dir`.
    pub fn diff(dir: &Path, parent: &Chain) -> Result<Self, ChainError> {
        if same_dir(dir, parent.dir()) {
            return Err(ChainError::SameDirectory(dir.to_owned()));
        }
        for g in &parent.header().generations {
            link_or_copy(&parent.dir().join(&g.name), &dir.join(&g.name))?;
        }
        Self::start(dir, parent.header().clone())
    }

    fn start(dir: &Path, mut header: Header) -> Result<Self, ChainError> {
        let generation = u16::try_from(header.generations.len())
            .ok()
            .filter(|g| *g < u16::MAX - 1)
            .ok_or(ChainError::TooDeep(header.generations.len()))?;
        let fresh = Generation::fresh().map_err(ChainError::Random)?;
        let path = dir.join(&fresh.name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(ChainError::io(&path))?;
        file.set_len(header.pages() * u64::from(header.page_size))
            .map_err(ChainError::io(&path))?;
        header.generations.push(fresh);
        Ok(Self {
            dir: dir.to_owned(),
            header,
            generation,
            path,
            file,
            run_start: 0,
            run: Vec::with_capacity(MAX_RUN_BYTES),
            pages_written: 0,
            zero_pages: 0,
        })
    }

    pub fn page_size(&self) -> usize {
        self.header.page_size as usize
    }

    pub fn pages(&self) -> u64 {
        self.header.pages()
    }

    /// Records page `index` with contents `data` (exactly one page) in the new generation.
    pub fn put_page(&mut self, index: u64, data: &[u8]) -> Result<(), ChainError> {
        let pages = self.pages();
        if index >= pages {
            return Err(ChainError::OutOfRange { index, pages });
        }
        if data.len() != self.page_size() {
            return Err(ChainError::BadBuffer {
                actual: data.len(),
                expected: self.page_size(),
            });
        }
        let i = usize::try_from(index).map_err(|_| ChainError::OutOfRange { index, pages })?;
        if is_zero(data) {
            self.header.map[i] = 0;
            self.header.crc[i] = 0;
            self.zero_pages += 1;
            return Ok(());
        }
        self.header.map[i] = self.generation + 1;
        self.header.crc[i] = crc32fast::hash(data);
        if self.generation == 0 {
            self.header.set_base_held(i);
        }
        let run_pages = (self.run.len() / self.page_size()) as u64;
        if self.run.len() >= MAX_RUN_BYTES || self.run_start + run_pages != index {
            self.flush_run()?;
            self.run_start = index;
        }
        self.run.extend_from_slice(data);
        self.pages_written += 1;
        Ok(())
    }

    /// Records every page of `data` (a whole number of pages) starting at page `first`.
    pub fn put_pages(&mut self, first: u64, data: &[u8]) -> Result<(), ChainError> {
        if !data.len().is_multiple_of(self.page_size()) {
            return Err(ChainError::BadBuffer {
                actual: data.len(),
                expected: self.page_size(),
            });
        }
        for (n, page) in (0u64..).zip(data.chunks_exact(self.page_size())) {
            self.put_page(first + n, page)?;
        }
        Ok(())
    }

    /// Makes the data durable, then atomically writes the header (the snapshot exists from
    /// this moment on).
    pub fn finish(mut self) -> Result<WriteSummary, ChainError> {
        self.flush_run()?;
        self.header.generations[usize::from(self.generation)].pages_held = self.pages_written;
        self.file.sync_data().map_err(ChainError::io(&self.path))?;
        let bytes = write_header(&self.dir, &self.header)?;
        Ok(WriteSummary {
            pages_written: self.pages_written,
            zero_pages: self.zero_pages,
            depth: self.header.generations.len(),
            pages: self.header.pages(),
            page_size: self.header.page_size,
            header_sha256: hex::encode(Sha256::digest(&bytes)),
        })
    }

    fn flush_run(&mut self) -> Result<(), ChainError> {
        if self.run.is_empty() {
            return Ok(());
        }
        let offset = self.run_start * u64::from(self.header.page_size);
        self.file
            .write_all_at(&self.run, offset)
            .map_err(ChainError::io(&self.path))?;
        self.run.clear();
        Ok(())
    }
}

/// Writes `header` as `dir/memory.hdr` through a temporary file and a rename.
fn write_header(dir: &Path, header: &Header) -> Result<Vec<u8>, ChainError> {
    let bytes = header.encode();
    let tmp = dir.join(format!("{HEADER_FILE}.tmp"));
    let path = dir.join(HEADER_FILE);
    let file = File::create(&tmp).map_err(ChainError::io(&tmp))?;
    file.write_all_at(&bytes, 0).map_err(ChainError::io(&tmp))?;
    file.sync_data().map_err(ChainError::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(ChainError::io(&path))?;
    if let Ok(d) = File::open(dir) {
        // Best effort: makes the rename durable; not all file systems support fsync on a dir.
        let _ = d.sync_all();
    }
    Ok(bytes)
}

/// Whether every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Hard-links `from` to `to`, or copies it when they are on different file systems.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), ChainError> {
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => std::fs::copy(from, to)
            .map(|_| ())
            .map_err(ChainError::io(to)),
        Err(source) => Err(ChainError::Io {
            path: to.to_owned(),
            source,
        }),
    }
}
