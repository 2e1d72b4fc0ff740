//! Network namespaces by name (`/var/run/netns/<name>`, as `ip netns` keeps them), and running
//! code or a process inside one.
//!
//! Entering a namespace changes the calling *thread*; doing that on a tokio worker would move
//! unrelated tasks into the sandbox. [`run_in`] therefore uses a short-lived thread of its own
//! that never comes back to the host namespace. Sockets and tap fds opened there stay bound to
//! the namespace after the thread ends.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{CloneFlags, setns};

/// The bind-mounted namespace file of `name` (where nlink, like `ip netns`, puts it).
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(nlink::netlink::namespace::NETNS_RUN_DIR).join(name)
}

/// Errors entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open the network namespace {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("cannot enter the network namespace {0}")]
    Enter(PathBuf, #[source] nix::Error),
    #[error("the thread working in network namespace {0} panicked")]
    Panicked(PathBuf),
    #[error("cannot start a thread for network namespace {0}")]
    Thread(PathBuf, #[source] io::Error),
}

/// Runs `f` on a fresh thread inside the namespace `name` and returns its result.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let path = path(name);
    let file = File::open(&path).map_err(|e| NetnsError::Open(path.clone(), e))?;
    let thread_path = path.clone();
    let handle = std::thread::Builder::new()
        .name("roost-netns".into())
        .spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetnsError::Enter(thread_path, e))?;
            Ok(f())
        })
        .map_err(|e| NetnsError::Thread(path.clone(), e))?;
    handle.join().map_err(|_| NetnsError::Panicked(path))?
}

/// Makes `command` start inside the namespace `name` (the namespace is opened now, entered in
/// the child between fork and exec).
pub fn command_in(name: &str, command: &mut Command) -> Result<(), NetnsError> {
    let path = path(name);
    let file = File::open(&path).map_err(|e| NetnsError::Open(path.clone(), e))?;
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which
    // is async-signal-safe; `file` is moved in and stays open until then.
    unsafe {
        command.pre_exec(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
        });
    }
    Ok(())
}
