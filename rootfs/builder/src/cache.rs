//! Content-addressed cache of built artefacts.
//!
//! Layout: `<root>/<kind>/<key>/` holds one finished artefact; `<root>/<kind>/<key>.lock`
//! serialises concurrent builds of the same key; `<root>/<kind>/.staging-<key>-<pid>/` holds a
//! build in progress and is renamed into place only when it succeeded. A finished entry is
//! never modified afterwards.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Environment variable that overrides the cache root.
pub const CACHE_DIR_ENV: &str = "ROOST_CACHE_DIR";

/// Errors from the artefact cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot find a cache directory: set {CACHE_DIR_ENV} or HOME")]
    NoCacheDir,
    #[error("cache I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CacheError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The hex SHA-256 of every input of one artefact.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// The full hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 16 hex digits: what directory names and summaries show.
    pub fn short(&self) -> &str {
        &self.0[..16]
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short())
    }
}

/// Collects the inputs of an artefact into a [`CacheKey`].
///
/// Each input is named and length-prefixed, so `("a", "bc")` and `("ab", "c")` hash apart and
/// reordering inputs changes the key.
#[derive(Debug, Clone)]
pub struct CacheKeyBuilder {
    hasher: Sha256,
}

impl CacheKeyBuilder {
    /// Starts a key for artefacts of `kind` (e.g. `kernel`, `rootfs`).
    pub fn new(kind: &str) -> Self {
        let mut builder = Self {
            hasher: Sha256::new(),
        };
        builder.add("kind", kind.as_bytes());
        builder
    }

    /// Adds a named input.
    pub fn add(&mut self, name: &str, value: &[u8]) -> &mut Self {
        for part in [name.as_bytes(), value] {
            self.hasher.update((part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    /// Adds the contents of a file as a named input, streaming it.
    pub fn add_file(&mut self, name: &str, path: &Path) -> Result<&mut Self, CacheError> {
        let digest = sha256_file(path)?;
        Ok(self.add(name, digest.as_bytes()))
    }

    /// Finishes the key.
    pub fn finish(&self) -> CacheKey {
        CacheKey(hex::encode(self.hasher.clone().finalize()))
    }
}

/// Hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    let mut file = File::open(path).map_err(CacheError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(CacheError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The cache root directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens the cache at `root`, creating it if needed.
    pub fn at(root: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(CacheError::io(&root))?;
        Ok(Self { root })
    }

    /// Opens the default cache: `$ROOST_CACHE_DIR`, else `$XDG_CACHE_HOME/roost`, else
    /// `$HOME/.cache/roost`.
    pub fn from_env() -> Result<Self, CacheError> {
        Self::at(default_root().ok_or(CacheError::NoCacheDir)?)
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The entry for `key` among artefacts of `kind`.
    pub fn entry(&self, kind: &str, key: &CacheKey) -> CacheEntry {
        CacheEntry {
            kind_dir: self.root.join(kind),
            key: key.clone(),
        }
    }
}

fn default_root() -> Option<PathBuf> {
    let non_empty = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    non_empty(CACHE_DIR_ENV)
        .or_else(|| non_empty("XDG_CACHE_HOME").map(|p| p.join("roost")))
        .or_else(|| non_empty("HOME").map(|p| p.join(".cache").join("roost")))
}

/// One artefact's slot in the cache.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    kind_dir: PathBuf,
    key: CacheKey,
}

/// Whether [`CacheEntry::get_or_build`] found the artefact or built it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cached,
    Built,
}

impl CacheEntry {
    /// The directory holding the finished artefact (it may not exist yet).
    pub fn dir(&self) -> PathBuf {
        self.kind_dir.join(self.key.as_str())
    }

    /// The key of this entry.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// Whether a finished artefact is present.
    pub fn is_ready(&self) -> bool {
        self.dir().is_dir()
    }

    /// Returns the finished artefact's directory, building it first with `build` if absent.
    ///
    /// `build` receives an empty staging directory to fill. Concurrent callers for the same key
    /// wait for each other (a file lock), so an artefact is built at most once. On error the
    /// staging directory is removed and nothing is published.
    pub fn get_or_build<E>(
        &self,
        build: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(PathBuf, Origin), E>
    where
        E: From<CacheError>,
    {
        let final_dir = self.dir();
        if final_dir.is_dir() {
            return Ok((final_dir, Origin::Cached));
        }
        fs::create_dir_all(&self.kind_dir).map_err(CacheError::io(&self.kind_dir))?;
        let lock_path = self.kind_dir.join(format!("{}.lock", self.key.as_str()));
        let lock = File::create(&lock_path).map_err(CacheError::io(&lock_path))?;
        lock.lock().map_err(CacheError::io(&lock_path))?;
        if final_dir.is_dir() {
            return Ok((final_dir, Origin::Cached));
        }
        self.remove_stale_staging()?;
        let staging = self.kind_dir.join(format!(
            ".staging-{}-{}",
            self.key.as_str(),
            std::process::id()
        ));
        fs::create_dir_all(&staging).map_err(CacheError::io(&staging))?;
        let guard = StagingGuard(staging.clone());
        build(&staging)?;
        fs::rename(&staging, &final_dir).map_err(CacheError::io(&final_dir))?;
        std::mem::forget(guard);
        Ok((final_dir, Origin::Built))
    }

    /// Removes staging directories of this key left by builds that were killed. Only called
    /// while holding the key's lock, so no live build owns one of them.
    fn remove_stale_staging(&self) -> Result<(), CacheError> {
        let prefix = format!(".staging-{}-", self.key.as_str());
        let entries = fs::read_dir(&self.kind_dir).map_err(CacheError::io(&self.kind_dir))?;
        for entry in entries {
            let entry = entry.map_err(CacheError::io(&self.kind_dir))?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                tracing::info!(path = %entry.path().display(), "removing a killed build's staging dir");
                remove_dir_if_present(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn remove_dir_if_present(path: &Path) -> Result<(), CacheError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Removes a staging directory when a build fails or panics.
struct StagingGuard(PathBuf);

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove staging dir");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_input_and_its_boundaries() {
        let key = |pairs: &[(&str, &str)]| {
            let mut b = CacheKeyBuilder::new("test");
            for (n, v) in pairs {
                b.add(n, v.as_bytes());
            }
            b.finish()
        };
        assert_eq!(key(&[("a", "1")]), key(&[("a", "1")]));
        assert_ne!(key(&[("a", "1")]), key(&[("a", "2")]));
        assert_ne!(key(&[("a", "bc")]), key(&[("ab", "c")]));
        assert_ne!(
            key(&[("a", "1"), ("b", "2")]),
            key(&[("b", "2"), ("a", "1")])
        );
        assert_ne!(
            CacheKeyBuilder::new("x").finish(),
            CacheKeyBuilder::new("y").finish()
        );
    }

    #[test]
    fn file_inputs_hash_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, "one").unwrap();
        let first = CacheKeyBuilder::new("t")
            .add_file("f", &path)
            .unwrap()
            .finish();
        fs::write(&path, "two").unwrap();
        let second = CacheKeyBuilder::new("t")
            .add_file("f", &path)
            .unwrap()
            .finish();
        assert_ne!(first, second);
        assert_eq!(second.short().len(), 16);
    }

    #[test]
    fn get_or_build_builds_once_then_hits() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let entry = cache.entry("kind", &CacheKeyBuilder::new("k").finish());
        assert!(!entry.is_ready());
        let (path, origin) = entry
            .get_or_build(|staging| {
                fs::write(staging.join("artefact"), "data").map_err(CacheError::io(staging))
            })
            .unwrap();
        assert_eq!(origin, Origin::Built);
        assert_eq!(fs::read_to_string(path.join("artefact")).unwrap(), "data");
        let (_, origin) = entry
            .get_or_build(|_| -> Result<(), CacheError> { panic!("must not rebuild") })
            .unwrap();
        assert_eq!(origin, Origin::Cached);
    }

    #[test]
    fn a_killed_builds_staging_dir_is_removed_by_the_next_build() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let key = CacheKeyBuilder::new("k").finish();
        let entry = cache.entry("kind", &key);
        let stale = dir
            .path()
            .join("kind")
            .join(format!(".staging-{}-999999", key.as_str()));
        let other_key = dir.path().join("kind").join(".staging-otherkey-1");
        fs::create_dir_all(stale.join("half-written")).unwrap();
        fs::create_dir_all(&other_key).unwrap();
        entry
            .get_or_build(|staging| {
                fs::write(staging.join("artefact"), "data").map_err(CacheError::io(staging))
            })
            .unwrap();
        assert!(!stale.exists(), "stale staging dir survived");
        assert!(other_key.exists(), "another key's staging dir was touched");
    }

    #[test]
    fn failed_build_publishes_nothing_and_leaves_no_staging() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let entry = cache.entry("kind", &CacheKeyBuilder::new("k").finish());
        let result = entry.get_or_build(|staging| {
            fs::write(staging.join("partial"), "x").unwrap();
            Err(CacheError::NoCacheDir)
        });
        assert!(result.is_err());
        assert!(!entry.is_ready());
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("kind"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with(".staging"))
            .collect();
        assert!(leftovers.is_empty(), "staging dirs left: {leftovers:?}");
    }
}
