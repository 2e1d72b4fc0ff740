//! Directory watches on inotify, shared by the streaming `WatchDir` and the polled
//! `CreateWatcher`/`GetWatcherEvents`/`RemoveWatcher`.
//!
//! The directory is checked with the user's credentials (it must be a directory they can
//! read); the inotify instance itself belongs to the agent. Recursive watches add a watch
//! for every subdirectory, including ones created later. Events are named relative to the
//! watched directory and typed as envd (fsnotify) does: a file moved in is a create, a file
//! moved out a rename.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches as InotifyWatches};
use tokio::sync::mpsc;

use super::entry::entry_info;
use crate::envd::connect::ConnectError;
use crate::envd::proto::filesystem::{EventType, FilesystemEvent};

/// Events kept for a polled watcher between two `GetWatcherEvents` calls; older ones drop.
const MAX_PENDING_EVENTS: usize = 10_000;

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::ONLYDIR
}

/// Starts watching `root`; events arrive on the receiver until it is dropped.
pub fn watch(
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
) -> Result<mpsc::Receiver<FilesystemEvent>, ConnectError> {
    let inotify =
        Inotify::init().map_err(|e| ConnectError::internal(format!("inotify_init: {e}")))?;
    let mut dirs: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
    let mut watches = inotify.watches();
    add_tree(&mut watches, &mut dirs, &root, recursive)
        .map_err(|e| ConnectError::from_io(&format!("watching {}", root.display()), &e))?;
    let mut stream = inotify
        .into_event_stream(vec![0u8; 64 * 1024])
        .map_err(|e| ConnectError::internal(format!("inotify stream: {e}")))?;
    let (sender, receiver) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut watches = stream.watches();
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                () = sender.closed() => return,
            };
            let Some(Ok(event)) = next else { return };
            let Some(dir) = dirs.get(&event.wd).cloned() else {
                continue;
            };
            if event.mask.contains(EventMask::IGNORED) {
                dirs.remove(&event.wd);
                continue;
            }
            let Some(name) = event.name else { continue };
            let path = dir.join(&name);
            if recursive
                && event.mask.contains(EventMask::ISDIR)
                && event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                && let Err(e) = add_tree(&mut watches, &mut dirs, &path, true)
            {
                tracing::debug!("cannot watch new directory {}: {e}", path.display());
            }
            let Some(kind) = event_type(event.mask) else {
                continue;
            };
            let message = FilesystemEvent {
                name: relative_name(&root, &path, &name),
                r#type: kind.into(),
                entry: if include_entry && kind != EventType::Remove && kind != EventType::Rename {
                    entry_info(&path).ok()
                } else {
                    None
                },
            };
            if sender.send(message).await.is_err() {
                return;
            }
        }
    });
    Ok(receiver)
}

fn add_tree(
    watches: &mut InotifyWatches,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    dir: &Path,
    recursive: bool,
) -> std::io::Result<()> {
    let wd = watches.add(dir, mask())?;
    dirs.insert(wd, dir.to_path_buf());
    if recursive {
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                // A subdirectory that vanished or cannot be read is skipped, not fatal.
                let _ = add_tree(watches, dirs, &entry.path(), true);
            }
        }
    }
    Ok(())
}

fn relative_name(root: &Path, path: &Path, name: &OsString) -> String {
    path.strip_prefix(root).map_or_else(
        |_| name.to_string_lossy().into_owned(),
        |p| p.to_string_lossy().into_owned(),
    )
}

fn event_type(mask: EventMask) -> Option<EventType> {
    if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
        Some(EventType::Create)
    } else if mask.intersects(EventMask::MODIFY) {
        Some(EventType::Write)
    } else if mask.intersects(EventMask::DELETE) {
        Some(EventType::Remove)
    } else if mask.intersects(EventMask::MOVED_FROM) {
        Some(EventType::Rename)
    } else if mask.intersects(EventMask::ATTRIB) {
        Some(EventType::Chmod)
    } else {
        None
    }
}

/// A polled watcher: its events pile up until fetched.
#[derive(Debug)]
struct Polled {
    events: Arc<Mutex<Vec<FilesystemEvent>>>,
    task: tokio::task::AbortHandle,
}

/// Polled watchers by id.
#[derive(Debug, Default)]
pub struct Watchers {
    by_id: Mutex<HashMap<String, Polled>>,
}

impl Watchers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Polled>> {
        self.by_id
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Collects a watch's events under a new id.
    pub fn create(&self, mut events: mpsc::Receiver<FilesystemEvent>) -> String {
        let pending = Arc::new(Mutex::new(Vec::new()));
        let sink = pending.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let mut pending = sink.lock().unwrap_or_else(|p| p.into_inner());
                if pending.len() >= MAX_PENDING_EVENTS {
                    pending.remove(0);
                }
                pending.push(event);
            }
        });
        let id = new_id();
        self.map().insert(
            id.clone(),
            Polled {
                events: pending,
                task: task.abort_handle(),
            },
        );
        id
    }

    /// Takes the events collected so far.
    pub fn take_events(&self, id: &str) -> Result<Vec<FilesystemEvent>, ConnectError> {
        let map = self.map();
        let polled = map
            .get(id)
            .ok_or_else(|| ConnectError::not_found(format!("watcher `{id}` not found")))?;
        let mut events = polled.events.lock().unwrap_or_else(|p| p.into_inner());
        Ok(std::mem::take(&mut *events))
    }

    pub fn remove(&self, id: &str) -> Result<(), ConnectError> {
        let polled = self
            .map()
            .remove(id)
            .ok_or_else(|| ConnectError::not_found(format!("watcher `{id}` not found")))?;
        // Aborting drops the receiver, which stops the inotify task.
        polled.task.abort();
        Ok(())
    }
}

/// A random watcher id (from the kernel's entropy; ids must not be guessable across users).
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if let Err(e) = getrandom(&mut bytes) {
        tracing::warn!("getrandom failed ({e}); using the clock");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom(buffer: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe a live, writable buffer.
    let n = unsafe { libc::getrandom(buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if usize::try_from(n).ok() == Some(buffer.len()) {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recursive_watch_reports_relative_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut events = watch(dir.path().to_path_buf(), true, true).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let first = events.recv().await.unwrap();
        assert_eq!(
            (first.name.as_str(), first.r#type),
            ("sub", EventType::Create as i32)
        );
        // Give the task a moment to add the watch on the new directory.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        std::fs::write(dir.path().join("sub/f.txt"), b"x").unwrap();
        let mut seen = Vec::new();
        while let Ok(Some(event)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), events.recv()).await
        {
            seen.push((event.name, event.r#type));
            if seen.iter().any(|(_, t)| *t == EventType::Write as i32) {
                break;
            }
        }
        assert!(
            seen.contains(&("sub/f.txt".into(), EventType::Create as i32)),
            "{seen:?}"
        );
        assert!(
            seen.contains(&("sub/f.txt".into(), EventType::Write as i32)),
            "{seen:?}"
        );
    }

    #[test]
    fn ids_are_random_hex() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
