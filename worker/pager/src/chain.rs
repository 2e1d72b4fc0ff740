//! Reading a memory chain: open a snapshot directory's header and the generation files it names,
//! refuse anything truncated or corrupted, and read pages with their checksums verified.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::format::{FormatError, Header, PageSource};

/// Name of the chain header inside a snapshot directory.
pub const HEADER_FILE: &str = "memory.hdr";

/// Why a chain could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("could not access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid memory header {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error(
        "memory file {path} is {actual} bytes, expected {expected}: truncated or not part of this snapshot"
    )]
    FileSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("page {index} of {path} fails its checksum: the memory file is corrupted")]
    PageChecksum { path: PathBuf, index: u64 },
    #[error("page {index} is outside the {pages}-page chain")]
    OutOfRange { index: u64, pages: u64 },
    #[error("a snapshot cannot be its own parent ({0})")]
    SameDirectory(PathBuf),
    #[error("the chain has {0} generations, the most a header can name")]
    TooDeep(usize),
    #[error("buffer of {actual} bytes given where a {expected}-byte page or page run was needed")]
    BadBuffer { actual: usize, expected: usize },
    #[error("could not draw a random generation id")]
    Random(#[source] getrandom::Error),
}

impl ChainError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// An opened, verified chain: its header and one open file per generation.
#[derive(Debug)]
pub struct Chain {
    dir: PathBuf,
    header: Header,
    header_sha256: String,
    files: Vec<File>,
}

impl Chain {
    /// Opens the chain of the snapshot in `dir`: decodes and checks `memory.hdr`, opens every
    /// generation file and checks its size.
    pub fn open(dir: &Path) -> Result<Self, ChainError> {
        let path = dir.join(HEADER_FILE);
        let bytes = std::fs::read(&path).map_err(ChainError::io(&path))?;
        let header = Header::decode(&bytes).map_err(|source| ChainError::Format {
            path: path.clone(),
            source,
        })?;
        let header_sha256 = hex::encode(Sha256::digest(&bytes));
        let expected = header.pages() * u64::from(header.page_size);
        let files = header
            .generations
            .iter()
            .map(|g| {
                let path = dir.join(&g.name);
                let file = File::open(&path).map_err(ChainError::io(&path))?;
                let actual = file.metadata().map_err(ChainError::io(&path))?.len();
                if actual != expected {
                    return Err(ChainError::FileSize {
                        path,
                        actual,
                        expected,
                    });
                }
                Ok(file)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            dir: dir.to_owned(),
            header,
            header_sha256,
            files,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// SHA-256 (hex) of the header file as read: what a VM state file records to name its memory.
    pub fn header_sha256(&self) -> &str {
        &self.header_sha256
    }

    pub fn page_size(&self) -> usize {
        self.header.page_size as usize
    }

    pub fn pages(&self) -> u64 {
        self.header.pages()
    }

    /// Bytes of guest memory the chain describes.
    pub fn len_bytes(&self) -> u64 {
        self.pages() * u64::from(self.header.page_size)
    }

    /// Number of generations (1 for a full or merged snapshot).
    pub fn depth(&self) -> usize {
        self.header.generations.len()
    }

    /// Path of generation `index`'s data file.
    pub fn generation_path(&self, index: usize) -> Option<PathBuf> {
        self.header
            .generations
            .get(index)
            .map(|g| self.dir.join(&g.name))
    }

    /// Generation `index`'s open data file.
    pub fn generation_file(&self, index: usize) -> Option<&File> {
        self.files.get(index)
    }

    /// Where page `index` lives.
    pub fn source(&self, index: u64) -> Result<PageSource, ChainError> {
        let i = self.index(index)?;
        Ok(self.header.source(i))
    }

    /// Reads page `index` into `buf` (exactly one page), verifying its checksum; zero pages are
    /// filled with zeros without any I/O.
    pub fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<PageSource, ChainError> {
        let i = self.index(index)?;
        if buf.len() != self.page_size() {
            return Err(ChainError::BadBuffer {
                actual: buf.len(),
                expected: self.page_size(),
            });
        }
        let source = self.header.source(i);
        match source {
            PageSource::Zero => buf.fill(0),
            PageSource::Generation(g) => {
                let g = usize::from(g);
                let path = || self.dir.join(&self.header.generations[g].name);
                self.files[g]
                    .read_exact_at(buf, index * u64::from(self.header.page_size))
                    .map_err(|source| ChainError::Io {
                        path: path(),
                        source,
                    })?;
                if crc32fast::hash(buf) != self.header.crc[i] {
                    return Err(ChainError::PageChecksum {
                        path: path(),
                        index,
                    });
                }
            }
        }
        Ok(source)
    }

    fn index(&self, index: u64) -> Result<usize, ChainError> {
        let out_of_range = || ChainError::OutOfRange {
            index,
            pages: self.pages(),
        };
        if index >= self.pages() {
            return Err(out_of_range());
        }
        usize::try_from(index).map_err(|_| out_of_range())
    }
}
