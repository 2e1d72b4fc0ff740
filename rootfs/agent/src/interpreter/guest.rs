//! Starting the interpreter in the guest: only in the `code-interpreter` image.
//!
//! The image build writes the image's name to `/etc/roost-image` (`rootfs/image/configure.sh`),
//! so init knows its template without probing for Python packages. Init starts
//! `roost-agent interpreter` as a child process: a separate process keeps tokio, the kernels and
//! their reaping out of PID 1 (init's reaper only collects the interpreter itself if it ever
//! exits). The child inherits init's blocked signals; `interpreter::run` unblocks them first
//! thing, so it handles SIGTERM when init shuts the guest down and its kernels get SIGINT.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// Written by the image build: the image's name.
pub const IMAGE_MARKER: &str = "/etc/roost-image";
/// The image whose sandboxes serve the code interpreter.
pub const CODE_INTERPRETER_IMAGE: &str = "code-interpreter";

/// Set once init has started the interpreter: the identity operation then waits for its admin
/// socket rather than skip it (the token must reach it).
static STARTED: AtomicBool = AtomicBool::new(false);

/// Whether this process started the interpreter.
pub fn was_started() -> bool {
    STARTED.load(Ordering::Acquire)
}

/// Whether the image named in `marker` is the code-interpreter image.
pub fn is_code_interpreter_image(marker: &Path) -> bool {
    std::fs::read_to_string(marker).is_ok_and(|name| name.trim() == CODE_INTERPRETER_IMAGE)
}

/// Starts `roost-agent interpreter` with its defaults (port 49999, user `user`) and its admin
/// socket (where the identity operation hands it the access token) when this is the
/// code-interpreter image. Returns the child, or `None` in other images.
pub fn start_if_code_interpreter_image() -> std::io::Result<Option<Child>> {
    if !is_code_interpreter_image(Path::new(IMAGE_MARKER)) {
        return Ok(None);
    }
    // The real path, so that `ps` shows `roost-agent interpreter`.
    let agent = std::env::current_exe()?;
    let child = Command::new(agent)
        .arg("interpreter")
        .arg("--admin-socket")
        .arg(crate::identity::DEFAULT_INTERPRETER_ADMIN_SOCKET)
        .stdin(Stdio::null())
        .spawn()?;
    STARTED.store(true, Ordering::Release);
    Ok(Some(child))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_code_interpreter_marker_starts_it() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("roost-image");
        assert!(!is_code_interpreter_image(&marker), "no marker");
        std::fs::write(&marker, "base\n").unwrap();
        assert!(!is_code_interpreter_image(&marker));
        std::fs::write(&marker, "code-interpreter\n").unwrap();
        assert!(is_code_interpreter_image(&marker));
    }
}
