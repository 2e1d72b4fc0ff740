//! Records where the most recently built artefact of each name lives.
//!
//! Builders write an entry after a build or a cache hit; consumers such as the host VM, tests
//! and benchmarks read it to find the kernel and images without recomputing cache keys (which
//! would need every build input, such as the agent binary). One small JSON file per name, so
//! concurrent builders of different artefacts never rewrite each other's records.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::Cache;

/// Errors reading or writing the artefact index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(
        "no `{name}` artefact has been built yet (looked in {path}); run `roost images build` first"
    )]
    NotBuilt { name: String, path: PathBuf },
    #[error(
        "the `{name}` artefact recorded in {record} is missing at {artefact}; run `roost images build` again"
    )]
    Vanished {
        name: String,
        record: PathBuf,
        artefact: PathBuf,
    },
    #[error("index I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("index record {path} is not valid")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One built artefact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artefact {
    /// Index name, such as `kernel` or `rootfs-base`.
    pub name: String,
    /// The artefact's main file.
    pub path: PathBuf,
    /// Full hex cache key.
    pub key: String,
    /// Size of the main file in bytes (allocated size for sparse images is smaller).
    pub size_bytes: u64,
}

/// The index under a cache root.
#[derive(Debug, Clone)]
pub struct ArtefactIndex {
    dir: PathBuf,
}

impl ArtefactIndex {
    /// The index kept in `cache`.
    pub fn new(cache: &Cache) -> Self {
        Self {
            dir: cache.root().join("index"),
        }
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Records `artefact` as the current one of its name.
    pub fn record(&self, artefact: &Artefact) -> Result<(), IndexError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| IndexError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.record_path(&artefact.name);
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        let json = serde_json::to_vec_pretty(artefact).map_err(|source| IndexError::Corrupt {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, json).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// The current artefact called `name`, checked to still exist.
    pub fn lookup(&self, name: &str) -> Result<Artefact, IndexError> {
        let path = self.record_path(name);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IndexError::NotBuilt {
                    name: name.to_owned(),
                    path,
                });
            }
            Err(source) => return Err(IndexError::Io { path, source }),
        };
        let artefact: Artefact =
            serde_json::from_slice(&text).map_err(|source| IndexError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if !artefact.path.exists() {
            return Err(IndexError::Vanished {
                name: name.to_owned(),
                record: path,
                artefact: artefact.path,
            });
        }
        Ok(artefact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_then_lookup_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let index = ArtefactIndex::new(&cache);
        let file = dir.path().join("vmlinux");
        fs::write(&file, "elf").unwrap();
        let artefact = Artefact {
            name: "kernel".into(),
            path: file,
            key: "ab".repeat(32),
            size_bytes: 3,
        };
        index.record(&artefact).unwrap();
        assert_eq!(index.lookup("kernel").unwrap(), artefact);
    }

    #[test]
    fn lookup_explains_missing_and_vanished_artefacts() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let index = ArtefactIndex::new(&cache);
        let err = index.lookup("rootfs-base").unwrap_err();
        assert!(matches!(err, IndexError::NotBuilt { .. }));
        assert!(err.to_string().contains("roost images build"));
        let artefact = Artefact {
            name: "kernel".into(),
            path: dir.path().join("gone"),
            key: String::new(),
            size_bytes: 0,
        };
        index.record(&artefact).unwrap();
        assert!(matches!(
            index.lookup("kernel"),
            Err(IndexError::Vanished { .. })
        ));
    }
}
