//! The jailer: starts a program (the VMM) in an empty room, so that a guest that escapes into
//! the VMM finds nothing to use. See `docs/threat-model.md`.
//!
//! [`run`] forks a child that is PID 1 of a new PID namespace and, in new mount, IPC, UTS and
//! network namespaces (the network one being the sandbox's own when given), sees only a
//! directory holding its binary and libraries, kernel, disks, sockets and memory files, plus a
//! private `/dev` with the device nodes it needs; it runs as an unprivileged uid/gid with no
//! capabilities and dies with its jailer. The VMM then installs its own seccomp filters before
//! any guest code runs (roost-vmm's `privileges` and `seccomp`). The sandbox's tap, which the
//! unprivileged uid could not attach to, is opened by the jailer in that namespace and handed
//! over as fd [`TAP_FD`].
//!
//! Every mount is made in the child's private mount namespace, so the host never sees one and
//! the jail directory is plain files afterwards: the jailer removes it when the program ends,
//! and [`remove_stale`] removes those left by a jailer that was killed (it refuses to touch a
//! directory under which a mount is visible, so a mistake can never delete host files through a
//! bind mount).
//!
//! `run` forks, so it must be called from a single-threaded process: the worker starts the
//! `roost jail` command rather than calling it in-process.

mod child;
mod spec;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2};

pub use spec::{JailMount, JailSpec};

/// Why a jail could not be made, run or removed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("a jailed program must not run as uid or gid 0: choose an unprivileged identity")]
    PrivilegedIdentity,
    #[error("{what} {path} must be an absolute path without `.`/`..` components")]
    BadPath { what: &'static str, path: PathBuf },
    #[error("mount spec {0:?}: use HOST[:INSIDE][:ro|:rw]")]
    BadMount(String),
    #[error("{0} does not exist")]
    MissingHostPath(PathBuf),
    #[error(
        "the jail directory {0} already exists (another jail, or a stale one: `roost jail clean`)"
    )]
    RootExists(PathBuf),
    #[error("the jailer must run single-threaded (it forks); found {0} threads")]
    Threads(usize),
    #[error("the jailer needs root (namespaces, mounts, device nodes)")]
    NotRoot,
    #[error("cannot {action}")]
    Sys {
        action: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the jail failed: {0}")]
    Setup(String),
    #[error("tap name {0:?}: 1 to 15 bytes, no '/'")]
    BadTap(String),
    #[error("{0} still has mounts under it; not removing it")]
    MountsLeft(PathBuf),
}

fn sys(action: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |source| JailError::Sys { action, source }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io {
        action,
        path,
        source,
    }
}

/// The descriptor a tap opened by the jailer ([`JailSpec::tap`]) has in the program.
pub const TAP_FD: std::os::fd::RawFd = 3;

/// The jailed program's pid (in our namespace), for the signal forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: std::ffi::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0
        && let Ok(signal) = Signal::try_from(signal)
    {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Runs `spec.program` jailed, waits for it, removes the jail directory and returns its exit
/// code (128 + N when killed by signal N). SIGTERM, SIGINT and SIGHUP sent to the jailer are
/// passed on to the program.
pub fn run(spec: &JailSpec) -> Result<i32, JailError> {
    spec.validate()?;
    if !nix::unistd::geteuid().is_root() {
        return Err(JailError::NotRoot);
    }
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    let netns = match &spec.netns {
        Some(path) => Some(OwnedFd::from(
            std::fs::File::open(path).map_err(io("open the network namespace", path))?,
        )),
        None => None,
    };
    std::fs::create_dir_all(spec.root.parent().unwrap_or(Path::new("/")))
        .map_err(io("create the parent of", &spec.root))?;
    std::fs::create_dir(&spec.root).map_err(io("create", &spec.root))?;
    let outcome = run_in_namespaces(spec, netns);
    let removed = remove_jail_dir(&spec.root);
    let code = outcome?;
    removed?;
    Ok(code)
}

fn run_in_namespaces(spec: &JailSpec, netns: Option<OwnedFd>) -> Result<i32, JailError> {
    // The child reports a setup failure through this pipe; a successful exec closes it empty.
    let (read_end, write_end) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("make a pipe"))?;
    // Children forked from here on start a new PID namespace (the jailer itself stays).
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare the PID namespace"))?;
    // SAFETY: the process is single-threaded (checked in `run`), so the child may allocate and
    // run arbitrary code until it execs or exits.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            drop(read_end);
            // The tap goes to TAP_FD just before exec: keep the report pipe out of its way.
            let write_end = if write_end.as_raw_fd() == TAP_FD {
                let moved = nix::fcntl::fcntl(
                    &write_end,
                    nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(TAP_FD + 1),
                );
                drop(write_end);
                match moved {
                    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
                    Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                    // SAFETY: _exit ends the child at once, without the parent's handlers.
                    Err(_) => unsafe { nix::libc::_exit(126) },
                }
            } else {
                write_end
            };
            let message = child::enter(spec, netns);
            let mut pipe = std::fs::File::from(write_end);
            let _ = std::io::Write::write_all(&mut pipe, message.as_bytes());
            // SAFETY: _exit ends the child without running the parent's atexit handlers or
            // destructors on state it shares with the parent.
            unsafe { nix::libc::_exit(126) }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            drop(netns);
            CHILD.store(child.as_raw(), Ordering::SeqCst);
            install_forwarders()?;
            let mut message = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut message);
            let status = wait_for(child);
            CHILD.store(0, Ordering::SeqCst);
            if !message.is_empty() {
                return Err(JailError::Setup(message));
            }
            status
        }
    }
}

fn install_forwarders() -> Result<(), JailError> {
    let action = SigAction::new(
        SigHandler::Handler(forward_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only reads an atomic and calls kill(2), both async-signal-safe.
        unsafe { sigaction(signal, &action) }.map_err(sys("install a signal forwarder"))?;
    }
    Ok(())
}

fn wait_for(child: Pid) -> Result<i32, JailError> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(sys("wait for the jailed program")(e)),
        }
    }
}

fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Removes a jail directory, refusing when a mount is visible under it.
pub fn remove_jail_dir(root: &Path) -> Result<(), JailError> {
    if !root.exists() {
        return Ok(());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
    if mounts_under(&mountinfo, root) {
        return Err(JailError::MountsLeft(root.to_path_buf()));
    }
    std::fs::remove_dir_all(root).map_err(io("remove", root))
}

/// Removes every jail directory under `base` (after a crash: their programs died with their
/// jailers). Returns the paths removed.
pub fn remove_stale(base: &Path) -> Result<Vec<PathBuf>, JailError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(base) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io("list", base)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io("list", base))?.path();
        if path.is_dir() {
            remove_jail_dir(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Whether `mountinfo` lists a mount point at or below `root`.
fn mounts_under(mountinfo: &str, root: &Path) -> bool {
    mount_points(mountinfo)
        .iter()
        .any(|point| point.starts_with(root))
}

/// The mount points a `/proc/<pid>/mountinfo` text lists, in its order.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|point| PathBuf::from(unescape_octal(point)))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\NNN`.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(value) = u8::from_str_radix(&text[i + 1..i + 4], 8)
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_below_a_root_are_found_and_others_ignored() {
        let info = "\
22 1 0:21 / / rw - ext4 /dev/vda rw
90 22 0:50 / /srv/jails/a/dev rw - tmpfs tmpfs rw
91 22 0:51 / /srv/jails/ab rw - tmpfs tmpfs rw
";
        assert!(mounts_under(info, Path::new("/srv/jails/a")));
        assert!(!mounts_under(info, Path::new("/srv/jails/b")));
        // A sibling whose name shares a prefix is not "under".
        assert!(!mounts_under(info, Path::new("/srv/jails/a/x")));
        assert!(mounts_under(info, Path::new("/srv/jails/ab")));
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        assert_eq!(unescape_octal("/srv/with\\040space"), "/srv/with space");
        assert_eq!(unescape_octal("/plain"), "/plain");
    }

    #[test]
    fn removing_refuses_a_directory_with_a_mount_under_it() {
        // The root file system is always a mount point.
        assert!(matches!(
            remove_jail_dir(Path::new("/")),
            Err(JailError::MountsLeft(_))
        ));
    }

    #[test]
    fn stale_sweep_removes_plain_directories() {
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("j1/run")).unwrap();
        std::fs::write(base.path().join("j1/run/serial.log"), "x").unwrap();
        let removed = remove_stale(base.path()).unwrap();
        assert_eq!(removed, [base.path().join("j1")]);
        assert!(!base.path().join("j1").exists());
        assert!(
            remove_stale(&base.path().join("missing"))
                .unwrap()
                .is_empty()
        );
    }
}
