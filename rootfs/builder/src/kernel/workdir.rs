//! The scratch directory of one kernel build (unpacked source and objects, ~1.5 GB), under the
//! cache root, removed when the build ends however it ends. A process killed outright cannot
//! clean up, so a new build of the same key first removes what dead builds of that key left:
//! the caller holds the cache entry's lock, so no live build of that key can own them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// A build's scratch directory; removed on drop.
#[derive(Debug)]
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// Creates `<parent>/.work-<key>-<pid>` after removing other `.work-<key>-*` directories.
    /// Call only while holding the lock of the cache entry for `key`.
    pub fn create(parent: &Path, key: &str) -> io::Result<Self> {
        fs::create_dir_all(parent)?;
        let prefix = format!(".work-{key}-");
        for entry in fs::read_dir(parent)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(&prefix))
            {
                tracing::info!(path = %entry.path().display(), "removing a dead kernel build's work dir");
                fs::remove_dir_all(entry.path())?;
            }
        }
        let path = parent.join(format!("{prefix}{}", std::process::id()));
        fs::create_dir(&path)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove kernel work dir");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_stale_dirs_of_its_key_only_and_itself_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let stale = parent.path().join(".work-aaaa-999999");
        fs::create_dir_all(stale.join("src")).unwrap();
        let other_key = parent.path().join(".work-bbbb-999999");
        fs::create_dir(&other_key).unwrap();
        let entry = parent.path().join("aaaa");
        fs::create_dir(&entry).unwrap();

        let work = WorkDir::create(parent.path(), "aaaa").unwrap();
        let path = work.path().to_owned();
        assert!(path.is_dir());
        assert!(
            !stale.exists(),
            "a dead build's dir of the same key must go"
        );
        assert!(
            other_key.exists() && entry.exists(),
            "other keys and entries must stay"
        );
        fs::write(path.join("object.o"), "x").unwrap();
        drop(work);
        assert!(!path.exists());
    }
}
