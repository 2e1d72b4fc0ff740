//! The per-VM runtime directory: one private (0700) directory per VM that holds everything the
//! VM leaves on the host file system — the vsock socket and the listeners beside it, the serial
//! log, the VMM's stderr, a writable rootfs copy — so that removing that one directory frees
//! it all, whichever way the VM ended.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// Name of the VMM's vsock Unix socket inside the runtime directory.
const VSOCK_SOCKET: &str = "vsock.sock";

/// A created runtime directory; removed (recursively) when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Creates `path` with mode 0700. It must not exist yet (a stale directory may hold another
    /// VM's sockets) and its parent must.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, RuntimeDirError> {
        let path = path.into();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| RuntimeDirError::Create {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VMM's vsock Unix socket (`--vsock-uds`).
    pub fn vsock_socket(&self) -> PathBuf {
        self.path.join(VSOCK_SOCKET)
    }

    /// The VMM's control API socket (`--api-socket`).
    pub fn api_socket(&self) -> PathBuf {
        self.path.join("api.sock")
    }

    /// The guest's serial console (`--serial-log`).
    /// The copy-on-write overlay over the root filesystem image (overlay disks).
    pub fn rootfs_overlay(&self) -> PathBuf {
        self.path.join("rootfs.cow")
    }

    /// The page server's socket (userfaultfd restores).
    pub fn pager_socket(&self) -> PathBuf {
        self.path.join("pager.sock")
    }

    /// The page server's stderr (userfaultfd restores).
    pub fn pager_stderr(&self) -> PathBuf {
        self.path.join("pager.stderr")
    }

    pub fn serial_log(&self) -> PathBuf {
        self.path.join("serial.log")
    }

    /// Everything the VMM writes to stderr (its exit reason, a panic line).
    pub fn vmm_stderr(&self) -> PathBuf {
        self.path.join("vmm.stderr")
    }

    /// Where a writable copy of the root filesystem goes.
    pub fn rootfs_copy(&self) -> PathBuf {
        self.path.join("rootfs.img")
    }

    /// Removes the socket files in the directory (the vsock socket and `<socket>_<port>`
    /// listeners): a VMM killed with SIGKILL cannot remove its own.
    pub fn remove_sockets(&self) {
        remove_sockets_in(&self.path);
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), "cannot remove the runtime directory: {e}");
        }
    }
}

/// Removes every Unix socket directly inside `dir`.
pub(crate) fn remove_sockets_in(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The last `max_bytes` of a file as text (lossy), starting at a line boundary when one is
/// near; empty when the file is missing.
pub fn tail(path: &Path, max_bytes: u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max_bytes);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let text = match (start > 0, text.find('\n')) {
        (true, Some(newline)) => &text[newline + 1..],
        _ => &text,
    };
    text.trim_end().to_owned()
}

/// The directory under which a CLI or worker puts its VMs' runtime directories when none is
/// configured: `$ROOST_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/roost`, else `/tmp/roost-<uid>`.
pub fn default_runtime_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("ROOST_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("roost");
    }
    std::env::temp_dir().join(format!("roost-{}", nix::unistd::getuid()))
}

/// Creates `root` (and its parents) if missing, the last component with mode 0700.
pub fn ensure_runtime_root(root: &Path) -> Result<(), RuntimeDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|source| RuntimeDirError::Create {
            path: root.to_owned(),
            source,
        })
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("cannot create runtime directory {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn created_private_and_removed_with_its_contents_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("vm1");
        let dir = RuntimeDir::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(dir.serial_log(), b"console").unwrap();
        let _listener = UnixListener::bind(dir.vsock_socket()).unwrap();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn an_existing_directory_is_not_taken_over() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("marker"), b"").unwrap();
        let error = RuntimeDir::create(root.path()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cannot create runtime directory")
        );
        assert!(root.path().join("marker").exists(), "left untouched");
    }

    #[test]
    fn remove_sockets_keeps_regular_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::create(root.path().join("vm")).unwrap();
        let _a = UnixListener::bind(dir.vsock_socket()).unwrap();
        let _b = UnixListener::bind(dir.path().join("vsock.sock_1024")).unwrap();
        std::fs::write(dir.serial_log(), b"log").unwrap();
        dir.remove_sockets();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("serial.log")]);
    }

    #[test]
    fn tail_starts_at_a_line_and_tolerates_missing_files() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("log");
        std::fs::write(&file, "first line\nsecond line\nthird\n").unwrap();
        assert_eq!(tail(&file, 14), "third");
        assert_eq!(tail(&file, 1000), "first line\nsecond line\nthird");
        assert_eq!(tail(&root.path().join("missing"), 100), "");
    }

    #[test]
    fn runtime_root_is_created_private() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("a/b");
        ensure_runtime_root(&path).unwrap();
        ensure_runtime_root(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
