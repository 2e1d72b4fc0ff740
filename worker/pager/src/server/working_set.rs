//! A recorded working set: the pages a fresh clone touched, in first-touch order, tied to the
//! chain they were recorded against. Replaying it first on the next restore turns the guest's
//! first seconds of faults into one sequential prefetch.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Format version of the working-set file.
pub const WORKING_SET_VERSION: u32 = 1;

/// The pages to prefetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub version: u32,
    /// The chain the pages were recorded against (SHA-256 hex of `memory.hdr`).
    pub header_sha256: String,
    /// Page indices in first-touch order.
    pub pages: Vec<u64>,
}

/// Why a working set could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    #[error("could not access working set {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("working set {path} is not valid")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "working set {path} has format version {version}; this build reads {WORKING_SET_VERSION}"
    )]
    Version { path: PathBuf, version: u32 },
    #[error("working set {path} was recorded for another memory snapshot")]
    OtherSnapshot { path: PathBuf },
}

impl WorkingSet {
    /// Loads a working set and checks it belongs to the chain with header `header_sha256`.
    pub fn load(path: &Path, header_sha256: &str) -> Result<Self, WorkingSetError> {
        let bytes = std::fs::read(path).map_err(|source| WorkingSetError::Io {
            path: path.to_owned(),
            source,
        })?;
        let set: Self = serde_json::from_slice(&bytes).map_err(|source| WorkingSetError::Json {
            path: path.to_owned(),
            source,
        })?;
        if set.version != WORKING_SET_VERSION {
            return Err(WorkingSetError::Version {
                path: path.to_owned(),
                version: set.version,
            });
        }
        if set.header_sha256 != header_sha256 {
            return Err(WorkingSetError::OtherSnapshot {
                path: path.to_owned(),
            });
        }
        Ok(set)
    }

    /// Writes the working set atomically (temporary file + rename).
    pub fn save(&self, path: &Path) -> Result<(), WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            path: path.to_owned(),
            source,
        };
        let bytes = serde_json::to_vec(self).map_err(|source| WorkingSetError::Json {
            path: path.to_owned(),
            source,
        })?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}
