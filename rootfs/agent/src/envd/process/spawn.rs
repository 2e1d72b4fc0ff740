//! Starting a process as a user: clean environment, its own session (so signals reach the
//! whole process group), credentials dropped in the child, optionally on a new PTY.
//!
//! Credentials are switched in the child between fork and exec (`pre_exec`): supplementary
//! groups, gid, then uid, then `chdir`, so the working directory is entered with the user's
//! rights. std's own `uid()`/`gid()` are not used because they would clear the supplementary
//! groups after our `setgroups`.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::pty::{Winsize, openpty};

use crate::children;
use crate::envd::connect::ConnectError;
use crate::envd::users::Account;

/// The `PATH` processes start with unless the sandbox's or request's variables override it.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to start.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    pub cmd: &'a str,
    pub args: &'a [String],
    pub env: HashMap<String, String>,
    pub cwd: &'a Path,
    pub account: &'a Account,
    /// Give the process a stdin pipe (else `/dev/null`); ignored with a PTY.
    pub stdin: bool,
    /// Run on a new PTY of this size (cols, rows).
    pub pty: Option<(u16, u16)>,
}

/// A started process and the parent's ends of its I/O.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub exit: children::Exit,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub stdin: Option<OwnedFd>,
    pub pty_master: Option<OwnedFd>,
}

/// The environment a process starts with: login basics, then the sandbox's variables, then
/// the request's.
pub fn environment(
    account: &Account,
    cwd: &Path,
    pty: bool,
    sandbox: &HashMap<String, String>,
    request: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), account.home.to_string_lossy().into_owned());
    env.insert("USER".into(), account.name.clone());
    env.insert("LOGNAME".into(), account.name.clone());
    env.insert("SHELL".into(), account.shell.to_string_lossy().into_owned());
    env.insert("PWD".into(), cwd.to_string_lossy().into_owned());
    env.insert("LANG".into(), "C.UTF-8".into());
    if pty {
        env.insert("TERM".into(), "xterm-256color".into());
    }
    env.extend(sandbox.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Starts the process.
pub fn spawn(request: &SpawnRequest<'_>) -> Result<Spawned, ConnectError> {
    let switch = credentials_to_switch(request.account)?;
    let cwd = CString::new(request.cwd.as_os_str().as_bytes())
        .map_err(|_| ConnectError::invalid("cwd contains a NUL byte"))?;
    let mut command = Command::new(request.cmd);
    command.args(request.args).env_clear().envs(&request.env);

    let mut pty_master = None;
    let with_pty = request.pty.is_some();
    if let Some((cols, rows)) = request.pty {
        let size = Winsize {
            ws_row: rows.max(1),
            ws_col: cols.max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty =
            openpty(&size, None).map_err(|e| ConnectError::internal(format!("openpty: {e}")))?;
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(|e| ConnectError::internal(format!("fcntl: {e}")))?;
        }
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| ConnectError::internal(format!("dup: {e}")))
        };
        command
            .stdin(Stdio::from(dup(&pty.slave)?))
            .stdout(Stdio::from(dup(&pty.slave)?))
            .stderr(Stdio::from(pty.slave));
        pty_master = Some(pty.master);
    } else {
        command
            .stdin(if request.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }

    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setsid, ioctl, setgroups, setgid, setuid, chdir) on data
    // prepared before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if with_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &switch
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::chdir(cwd.as_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let (mut child, exit) = children::spawn(&mut command).map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                crate::envd::connect::Code::InvalidArgument
            }
            _ => crate::envd::connect::Code::Internal,
        };
        ConnectError::new(
            code,
            format!(
                "cannot start `{}` in {}: {e}",
                request.cmd,
                request.cwd.display()
            ),
        )
    })?;
    // The parent's copies of the PTY slave live in `command`: close them now, or the master
    // would never see end of input.
    drop(command);
    let pid = child.id();
    Ok(Spawned {
        pid,
        exit,
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
        stdin: child.stdin.take().map(OwnedFd::from),
        pty_master,
    })
}

type Switch = (libc::uid_t, libc::gid_t, Vec<libc::gid_t>);

/// The uid, gid and groups the child must take, or `None` to keep the agent's.
fn credentials_to_switch(account: &Account) -> Result<Option<Switch>, ConnectError> {
    let me = nix::unistd::geteuid();
    if me == account.uid {
        return Ok(None);
    }
    if !me.is_root() {
        return Err(ConnectError::new(
            crate::envd::connect::Code::PermissionDenied,
            format!(
                "the agent runs as uid {me}, not root, and cannot start processes as `{}`",
                account.name
            ),
        ));
    }
    let groups = account.groups.iter().map(|g| g.as_raw()).collect();
    Ok(Some((account.uid.as_raw(), account.gid.as_raw(), groups)))
}

/// Sets a PTY's window size.
pub fn resize(master: &impl AsRawFd, cols: u16, rows: u16) -> Result<(), ConnectError> {
    let size = libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points at a live local.
    let result = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if result < 0 {
        return Err(ConnectError::internal(format!(
            "resizing the PTY: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_variables_override_sandbox_ones_which_override_defaults() {
        let account = Account::lookup("root").unwrap();
        let sandbox = HashMap::from([("A".into(), "sandbox".into()), ("PATH".into(), "/x".into())]);
        let request = HashMap::from([("A".into(), "request".into())]);
        let env = environment(&account, Path::new("/tmp"), true, &sandbox, &request);
        assert_eq!(env["A"], "request");
        assert_eq!(env["PATH"], "/x");
        assert_eq!(env["HOME"], account.home.to_string_lossy());
        assert_eq!(env["TERM"], "xterm-256color");
        assert_eq!(env["PWD"], "/tmp");
    }
}
