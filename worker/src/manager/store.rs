//! The manager's files. Two roots:
//!
//! - the **runtime root** (tmpfs-like, per boot): one directory per running VM, named after the
//!   sandbox id (sockets, serial log, VMM stderr). Everything in it belongs to this worker, so
//!   whatever a crashed worker left there is removed at start-up ([`clear_runtime_root`]).
//! - the **data directory** (persistent):
//!   - `paused/<sandbox id>/` — a paused sandbox: `sandbox.json` ([`PausedRecord`]) and its
//!     snapshot generations `gen-<n>/` (a diff reads disk layers from its parents). The
//!     directory also exists while a resumed sandbox runs (its generation is the parent of the
//!     next diff pause); the record then says `paused: false` and a restart drops it, since the
//!     VM died with the worker and the snapshot is older than what the user saw.
//!   - `snapshots/<snapshot id>/` — snapshots taken as templates: `snapshot/` (the VMM's
//!     directory) and `template.json` ([`SnapshotRecord`]).
//!
//! Records are written to a temporary file and renamed, so a crash leaves the old or the new
//! one. Ids become path components only after [`valid_id`] accepted them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vm_handle::SNAPSHOT_STATE_FILE;

pub const PAUSED_DIR: &str = "paused";
pub const SNAPSHOTS_DIR: &str = "snapshots";
pub const RECORD_FILE: &str = "sandbox.json";
pub const TEMPLATE_RECORD_FILE: &str = "template.json";
pub const SNAPSHOT_SUBDIR: &str = "snapshot";

/// What a paused sandbox needs to be reported and resumed (no secrets: control sends the env
/// vars and token again with the resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedRecord {
    pub sandbox_id: String,
    pub team_id: String,
    pub template_id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// The generation directory (`gen-<n>`) holding the current snapshot.
    pub generation: String,
    /// False while the sandbox runs again after a resume.
    pub paused: bool,
}

/// A snapshot offered as a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub snapshot_id: String,
    /// The sandbox it was taken from, and that sandbox's template.
    pub sandbox_id: String,
    pub template_id: String,
    pub size_bytes: u64,
}

/// Whether `id` may name a directory: 1–64 ASCII letters, digits, `-` and `_`, not starting
/// with `-` (sandbox ids `cl-…`, snapshot ids `snap_…`, template names).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn paused_dir(data_dir: &Path, sandbox_id: &str) -> PathBuf {
    data_dir.join(PAUSED_DIR).join(sandbox_id)
}

pub fn snapshot_entry(data_dir: &Path, snapshot_id: &str) -> PathBuf {
    data_dir.join(SNAPSHOTS_DIR).join(snapshot_id)
}

/// `gen-<n>`.
pub fn generation_name(n: u64) -> String {
    format!("gen-{n}")
}

/// The number of `gen-<n>`, if it is one.
pub fn generation_number(name: &str) -> Option<u64> {
    name.strip_prefix("gen-")?.parse().ok()
}

/// Writes `value` as JSON to `path` through a temporary file and a rename.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Removes a file or directory tree; a missing one is fine.
pub fn remove_all(path: &Path) -> std::io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes everything inside `root` (a previous run's runtime directories); returns what was
/// removed.
pub fn clear_runtime_root(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        remove_all(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

/// What the data directory holds at start-up, after dropping what a crash left half done.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Paused sandboxes by id.
    pub paused: BTreeMap<String, PausedRecord>,
    /// Snapshot templates by id.
    pub snapshots: BTreeMap<String, SnapshotRecord>,
    /// Directories removed (incomplete pauses, sandboxes that were running, partial snapshots).
    pub removed: Vec<PathBuf>,
}

/// Reads `data_dir`'s paused sandboxes and snapshots, creating the two directories if needed.
/// A paused sandbox keeps its current generation and the older ones (its parents); newer
/// ones (a pause that never finished) and anything without a valid record and state file are
/// removed.
pub fn recover(data_dir: &Path) -> std::io::Result<Recovered> {
    let mut out = Recovered::default();
    let paused_root = data_dir.join(PAUSED_DIR);
    let snapshots_root = data_dir.join(SNAPSHOTS_DIR);
    std::fs::create_dir_all(&paused_root)?;
    std::fs::create_dir_all(&snapshots_root)?;
    for entry in std::fs::read_dir(&paused_root)? {
        let dir = entry?.path();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let record: Option<PausedRecord> = read_json(&dir.join(RECORD_FILE));
        let usable = record.filter(|r| {
            valid_id(name)
                && r.sandbox_id == name
                && r.paused
                && dir.join(&r.generation).join(SNAPSHOT_STATE_FILE).is_file()
        });
        let Some(record) = usable else {
            remove_all(&dir)?;
            out.removed.push(dir);
            continue;
        };
        for gen_entry in std::fs::read_dir(&dir)? {
            let path = gen_entry?.path();
            let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let current = generation_number(&record.generation).unwrap_or(0);
            let older = generation_number(file).is_some_and(|n| n <= current);
            if file != RECORD_FILE && !older {
                remove_all(&path)?;
                out.removed.push(path);
            }
        }
        out.paused.insert(record.sandbox_id.clone(), record);
    }
    for entry in std::fs::read_dir(&snapshots_root)? {
        let dir = entry?.path();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let record: Option<SnapshotRecord> = read_json(&dir.join(TEMPLATE_RECORD_FILE));
        let usable = record.filter(|r| {
            valid_id(name)
                && r.snapshot_id == name
                && dir
                    .join(SNAPSHOT_SUBDIR)
                    .join(SNAPSHOT_STATE_FILE)
                    .is_file()
        });
        match usable {
            Some(record) => {
                out.snapshots.insert(record.snapshot_id.clone(), record);
            }
            None => {
                remove_all(&dir)?;
                out.removed.push(dir);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, generation: &str, paused: bool) -> PausedRecord {
        PausedRecord {
            sandbox_id: id.into(),
            team_id: "t".into(),
            template_id: "base".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            generation: generation.into(),
            paused,
        }
    }

    fn snapshot_dir(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(SNAPSHOT_STATE_FILE), b"state").unwrap();
    }

    #[test]
    fn ids_that_could_escape_a_directory_are_refused() {
        for good in ["cl-abc123", "snap_x1", "base", "code-interpreter"] {
            assert!(valid_id(good), "{good}");
        }
        for bad in ["", "..", "a/b", "-rf", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert_eq!(generation_number(&generation_name(7)), Some(7));
        assert_eq!(generation_number("gen-x"), None);
    }

    #[test]
    fn recovery_keeps_paused_sandboxes_and_snapshots_and_drops_the_rest() {
        let data = tempfile::tempdir().unwrap();
        let d = data.path();
        // A paused sandbox with an older generation (its parent) and a partial newer one.
        let p = paused_dir(d, "cl-paused");
        snapshot_dir(&p.join("gen-2"));
        std::fs::create_dir_all(p.join("gen-1")).unwrap();
        std::fs::create_dir_all(p.join("gen-3")).unwrap();
        write_json(&p.join(RECORD_FILE), &record("cl-paused", "gen-2", true)).unwrap();
        // A sandbox that was running again when the worker died.
        let r = paused_dir(d, "cl-running");
        snapshot_dir(&r.join("gen-1"));
        write_json(&r.join(RECORD_FILE), &record("cl-running", "gen-1", false)).unwrap();
        // A pause that never finished (no record).
        snapshot_dir(&paused_dir(d, "cl-half").join("gen-1"));
        // A record whose generation lacks its state file.
        let s = paused_dir(d, "cl-nostate");
        std::fs::create_dir_all(s.join("gen-1")).unwrap();
        write_json(&s.join(RECORD_FILE), &record("cl-nostate", "gen-1", true)).unwrap();
        // One complete snapshot template and one partial.
        let good = snapshot_entry(d, "snap_a");
        snapshot_dir(&good.join(SNAPSHOT_SUBDIR));
        let snap = SnapshotRecord {
            snapshot_id: "snap_a".into(),
            sandbox_id: "cl-paused".into(),
            template_id: "base".into(),
            size_bytes: 9,
        };
        write_json(&good.join(TEMPLATE_RECORD_FILE), &snap).unwrap();
        snapshot_dir(&snapshot_entry(d, "snap_b").join(SNAPSHOT_SUBDIR));

        let found = recover(d).unwrap();
        assert_eq!(
            found.paused.keys().collect::<Vec<_>>(),
            ["cl-paused"],
            "{found:?}"
        );
        assert_eq!(found.paused["cl-paused"].generation, "gen-2");
        assert_eq!(found.snapshots.get("snap_a"), Some(&snap));
        assert_eq!(found.snapshots.len(), 1);
        let mut left: Vec<_> = std::fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["gen-1", "gen-2", RECORD_FILE]);
        for gone in ["cl-running", "cl-half", "cl-nostate"] {
            assert!(!paused_dir(d, gone).exists(), "{gone}");
        }
        assert!(!snapshot_entry(d, "snap_b").exists());
        assert_eq!(found.removed.len(), 5, "{:?}", found.removed);
    }

    #[test]
    fn the_runtime_root_is_emptied() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("cl-a/sub")).unwrap();
        std::fs::write(root.path().join("stray"), b"x").unwrap();
        let removed = clear_runtime_root(root.path()).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }
}
