//! Starting, signalling and stopping one `ipykernel` process.
//!
//! Each kernel gets its own directory (owned by the kernel's user) holding its connection file
//! and its ZeroMQ sockets: the kernel is told to use the `ipc` transport, so its channels are
//! Unix sockets there rather than TCP ports on loopback — no port can be taken by someone else
//! between choosing and binding it, and nothing listens on the sandbox's network. The kernel
//! leads its own process group, so an interrupt (SIGINT) or a kill also reaches whatever it
//! started, as Jupyter does.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use jupyter_protocol::{ConnectionInfo, Transport};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

/// Who a kernel runs as, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl KernelUser {
    /// Looks a user up in the passwd database.
    pub fn lookup(name: &str) -> Result<Self, LookupError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|source| LookupError::Passwd {
                name: name.to_owned(),
                source,
            })?
            .ok_or_else(|| LookupError::NoSuchUser(name.to_owned()))?;
        Ok(Self {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        })
    }
}

#[derive(Debug, Error)]
pub enum LookupError {
    #[error("no user `{0}` in the passwd database")]
    NoSuchUser(String),
    #[error("cannot read the passwd entry of `{name}`")]
    Passwd {
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// How kernels are started: the same for every context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCommand {
    /// A Python with `ipykernel` (the image's `python3`; the SDK venv's in tests).
    pub python: PathBuf,
    pub user: KernelUser,
    /// Parent of the per-kernel directories (connection file and sockets).
    pub runtime_dir: PathBuf,
    /// Added to the kernel's environment after the defaults.
    pub extra_env: Vec<(String, String)>,
}

/// The last bytes of a kernel's stderr are kept to explain a kernel that fails to start.
const STDERR_TAIL_BYTES: usize = 4096;

/// A running (or exited) kernel process.
#[derive(Debug)]
pub struct KernelProcess {
    /// The kernel's pid, which is also its process group.
    pid: Pid,
    dir: PathBuf,
    connection: ConnectionInfo,
    exit: watch::Receiver<Option<String>>,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
}

#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("cannot prepare the kernel directory {0}")]
    Directory(PathBuf, #[source] std::io::Error),
    #[error("cannot write the connection file {0}")]
    ConnectionFile(PathBuf, #[source] std::io::Error),
    #[error("cannot start {0}")]
    Exec(PathBuf, #[source] std::io::Error),
    #[error("the kernel process has no pid")]
    NoPid,
}

impl KernelProcess {
    /// Starts `python -m ipykernel_launcher` for the kernel `name` (a context id) in `cwd`.
    pub fn spawn(command: &KernelCommand, name: &str, cwd: &Path) -> Result<Self, SpawnError> {
        let dir = command.runtime_dir.join(name);
        prepare_dir(&dir, &command.user).map_err(|e| SpawnError::Directory(dir.clone(), e))?;
        let connection = ipc_connection_info(&dir);
        let connection_file = dir.join("connection.json");
        write_connection_file(&connection_file, &connection, &command.user)
            .map_err(|e| SpawnError::ConnectionFile(connection_file.clone(), e))?;

        let mut cmd = Command::new(&command.python);
        cmd.arg("-m")
            .arg("ipykernel_launcher")
            .arg("-f")
            .arg(&connection_file)
            // Tracebacks without ANSI colour codes, as E2B's kernels send them.
            .arg("--InteractiveShell.colors=NoColor")
            .current_dir(cwd)
            .env_clear()
            .envs(kernel_env(&command.user))
            .envs(command.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if Uid::effective().is_root() {
            // std drops supplementary groups when it changes uid as root.
            cmd.uid(command.user.uid).gid(command.user.gid);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| SpawnError::Exec(command.python.clone(), e))?;
        let raw_pid = child.id().ok_or(SpawnError::NoPid)?;
        let pid = Pid::from_raw(i32::try_from(raw_pid).map_err(|_| SpawnError::NoPid)?);

        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(keep_stderr_tail(stderr, Arc::clone(&stderr_tail), pid));
        }
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            tracing::info!(pid = pid.as_raw(), %status, "kernel exited");
            let _ = exit_tx.send(Some(status));
        });
        Ok(Self {
            pid,
            dir,
            connection,
            exit,
            stderr_tail,
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn connection(&self) -> &ConnectionInfo {
        &self.connection
    }

    /// How the process ended, once it has.
    pub fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// A receiver that changes when the process exits.
    pub fn exit_watch(&self) -> watch::Receiver<Option<String>> {
        self.exit.clone()
    }

    /// The end of what the kernel wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        String::from_utf8_lossy(&tail).into_owned()
    }

    /// SIGINT to the kernel's process group: ipykernel turns it into `KeyboardInterrupt` in
    /// the running cell (and ignores it when idle).
    pub fn interrupt(&self) {
        signal_group(self.pid, Signal::SIGINT);
    }

    /// SIGKILL to the kernel's process group, then waits for the kernel to be gone.
    pub async fn kill(&self) {
        signal_group(self.pid, Signal::SIGKILL);
        let mut exit = self.exit.clone();
        let _ = exit.wait_for(Option::is_some).await;
    }
}

impl Drop for KernelProcess {
    fn drop(&mut self) {
        if self.exit.borrow().is_none() {
            signal_group(self.pid, Signal::SIGKILL);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), "cannot remove the kernel directory: {e}");
        }
    }
}

fn signal_group(pid: Pid, signal: Signal) {
    match killpg(pid, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            pid = pid.as_raw(),
            "cannot send {signal} to the kernel: {e}"
        ),
    }
}

/// The kernel's environment: a clean login-like one, not the agent's.
fn kernel_env(user: &KernelUser) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), user.home.display().to_string()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("SHELL".into(), "/bin/bash".into()),
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("LANG".into(), "C.UTF-8".into()),
        // Figures become image/png display_data when shown or left at the end of a cell.
        (
            "MPLBACKEND".into(),
            "module://matplotlib_inline.backend_inline".into(),
        ),
        // ipykernel exits by itself when this process goes away.
        ("JPY_PARENT_PID".into(), std::process::id().to_string()),
        ("PYDEVD_DISABLE_FILE_VALIDATION".into(), "1".into()),
    ]
}

/// Channels as Unix sockets `<dir>/k-<n>`; the key signs every message (HMAC-SHA256).
fn ipc_connection_info(dir: &Path) -> ConnectionInfo {
    ConnectionInfo {
        transport: Transport::IPC,
        ip: dir.join("k").display().to_string(),
        stdin_port: 1,
        control_port: 2,
        hb_port: 3,
        shell_port: 4,
        iopub_port: 5,
        signature_scheme: "hmac-sha256".into(),
        key: uuid::Uuid::new_v4().simple().to_string(),
        kernel_name: Some("python3".into()),
    }
}

fn prepare_dir(dir: &Path, user: &KernelUser) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    chown_to(dir, user)
}

fn write_connection_file(
    path: &Path,
    connection: &ConnectionInfo,
    user: &KernelUser,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let json = serde_json::to_vec_pretty(connection).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&json)?;
    chown_to(path, user)
}

fn chown_to(path: &Path, user: &KernelUser) -> std::io::Result<()> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    nix::unistd::chown(
        path,
        Some(Uid::from_raw(user.uid)),
        Some(Gid::from_raw(user.gid)),
    )
    .map_err(std::io::Error::from)
}

async fn keep_stderr_tail(
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<Vec<u8>>>,
    pid: Pid,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(pid = pid.as_raw(), "kernel: {line}");
        if let Ok(mut tail) = tail.lock() {
            tail.extend_from_slice(line.as_bytes());
            tail.push(b'\n');
            if tail.len() > STDERR_TAIL_BYTES {
                let cut = tail.len() - STDERR_TAIL_BYTES;
                tail.drain(..cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_channels_live_in_the_kernel_directory() {
        let info = ipc_connection_info(Path::new("/run/roost-interpreter/abc"));
        assert_eq!(info.shell_url(), "ipc:///run/roost-interpreter/abc/k-4");
        assert_eq!(info.iopub_url(), "ipc:///run/roost-interpreter/abc/k-5");
        assert_eq!(info.key.len(), 32);
        assert_ne!(
            info.key,
            ipc_connection_info(Path::new("/x")).key,
            "a fresh key per kernel"
        );
    }

    #[test]
    fn the_kernel_environment_is_the_users_not_ours() {
        let user = KernelUser {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/user".into(),
        };
        let env = kernel_env(&user);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("HOME"), Some("/home/user"));
        assert_eq!(get("USER"), Some("user"));
        assert_eq!(
            get("MPLBACKEND"),
            Some("module://matplotlib_inline.backend_inline")
        );
        assert!(get("RUST_LOG").is_none());
    }

    #[test]
    fn unknown_users_are_an_error() {
        assert!(matches!(
            KernelUser::lookup("no-such-user-roost"),
            Err(LookupError::NoSuchUser(_))
        ));
        assert_eq!(KernelUser::lookup("root").unwrap().uid, 0);
    }
}
