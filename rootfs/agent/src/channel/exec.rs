//! Exec: run a process, stream its stdout and stderr, feed its stdin, report how it ended.
//!
//! The process leads its own process group; signals from the client, and the SIGKILL sent
//! when the connection drops before the process ends, go to the whole group. Exit statuses come
//! from the shared reaper through [`crate::children`], never from `wait` here; a group is
//! signalled only while its leader is registered there (not yet collected), so the pid cannot
//! have been reused.
//!
//! Flow control: output is read only as fast as the client takes it (the process blocks on a
//! full pipe), and stdin chunks queue in a small bounded channel to a writer task. While that
//! queue is full (the process does not read its stdin), the agent stops reading the connection,
//! so a `Signal` behind queued stdin waits until the process reads or exits.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::{Gid, Pid, Uid, User};
use roost_proto::agent::{
    AgentMessage, ClientMessage, ErrorKind, ErrorReply, ExecRequest, ExitStatus, Frame,
    MAX_CHUNK_LEN, Program, StreamKind, UserSpec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use super::connection::{Conn, frame_error, send};

/// `PATH` for a process started with a cleared environment, or when the agent has none (as
/// PID 1).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output is still collected after the process exits, for background processes that
/// inherited its stdout or stderr.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
/// Stdin chunks queued for the process before the agent stops reading the connection.
const STDIN_QUEUE: usize = 8;

pub async fn run(request: ExecRequest, conn: &mut Conn) -> Result<(), ErrorReply> {
    let mut command = build_command(&request)?;
    let name = program_name(&request.program);
    let (mut child, mut exit) =
        crate::children::spawn(&mut command).map_err(|e| spawn_error(&name, &e))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(|e| internal(&e))?);
    let mut running = Running { pid, ended: false };
    let stdout = take_pipe(child.stdout.take().map(OwnedFd::from))?;
    let stderr = take_pipe(child.stderr.take().map(OwnedFd::from))?;
    let mut stdin = match child.stdin.take() {
        Some(stdin) => {
            let sender =
                pipe::Sender::from_owned_fd(OwnedFd::from(stdin)).map_err(|e| internal(&e))?;
            let (tx, rx) = mpsc::channel(STDIN_QUEUE);
            tokio::spawn(write_stdin(sender, rx));
            Some(tx)
        }
        None => None,
    };
    send(conn, AgentMessage::Started { pid: child.id() }).await?;

    let (mut stdout, mut stderr) = (Some(stdout), Some(stderr));
    let (mut stdout_buf, mut stderr_buf) = (BytesMut::new(), BytesMut::new());
    let mut queued_stdin: Option<Bytes> = None;
    let mut status: Option<WaitStatus> = None;
    let drain = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain);
    while status.is_none() || stdout.is_some() || stderr.is_some() {
        tokio::select! {
            chunk = read_chunk(stdout.as_mut(), &mut stdout_buf) => match chunk {
                Some(bytes) => send_data(conn, StreamKind::Stdout, bytes).await?,
                None => stdout = None,
            },
            chunk = read_chunk(stderr.as_mut(), &mut stderr_buf) => match chunk {
                Some(bytes) => send_data(conn, StreamKind::Stderr, bytes).await?,
                None => stderr = None,
            },
            collected = &mut exit, if status.is_none() => {
                let collected = collected.map_err(|_| ErrorReply::new(
                    ErrorKind::Io,
                    "the process's exit status was lost",
                ))?;
                status = Some(collected);
                running.ended = true;
                stdin = None;
                queued_stdin = None;
                drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            },
            () = &mut drain, if status.is_some() => {
                stdout = None;
                stderr = None;
            },
            sent = reserve(stdin.clone()), if queued_stdin.is_some() => match sent {
                Some(permit) => {
                    permit.send(queued_stdin.take().unwrap_or_default());
                }
                None => {
                    // The process closed its stdin: further input has nowhere to go.
                    stdin = None;
                    queued_stdin = None;
                }
            },
            frame = conn.next(), if queued_stdin.is_none() => match frame {
                None => {
                    return Err(ErrorReply::new(ErrorKind::Io, "the client closed the connection"));
                }
                Some(Err(e)) => return Err(frame_error(&e)),
                Some(Ok(Frame::Data(StreamKind::Stdin, bytes))) => {
                    if let Some(tx) = &stdin {
                        match tx.try_send(bytes) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(bytes)) => queued_stdin = Some(bytes),
                            Err(mpsc::error::TrySendError::Closed(_)) => stdin = None,
                        }
                    }
                }
                Some(Ok(Frame::Data(kind, _))) => {
                    return Err(ErrorReply::new(
                        ErrorKind::BadRequest,
                        format!("{kind:?} data is not valid in an exec"),
                    ));
                }
                Some(Ok(Frame::Message(ClientMessage::CloseStdin))) => stdin = None,
                Some(Ok(Frame::Message(ClientMessage::Signal { signal }))) => {
                    let signal = Signal::try_from(signal).map_err(|_| {
                        ErrorReply::new(ErrorKind::BadRequest, format!("unknown signal {signal}"))
                    })?;
                    if status.is_none() {
                        signal_group(pid, signal);
                    }
                }
                Some(Ok(Frame::Message(ClientMessage::End))) => {
                    return Err(ErrorReply::new(ErrorKind::BadRequest, "`end` is not valid in an exec"));
                }
            },
        }
    }
    let status = status.map_or(
        ExitStatus {
            code: None,
            signal: None,
        },
        exit_status,
    );
    send(conn, AgentMessage::Exited(status)).await
}

/// Kills the process group if the exec ends (client gone, protocol error) before the process.
#[derive(Debug)]
struct Running {
    pid: Pid,
    ended: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.ended {
            signal_group(self.pid, Signal::SIGKILL);
        }
    }
}

/// Sends `signal` to the process group `pid` leads, unless the leader has been collected.
fn signal_group(pid: Pid, signal: Signal) {
    let registered = crate::children::lock();
    if registered.contains_key(&pid.as_raw()) {
        // ESRCH (the group is gone) is the only expected failure: nothing to signal then.
        let _ = nix::sys::signal::kill(Pid::from_raw(-pid.as_raw()), signal);
    }
}

fn build_command(request: &ExecRequest) -> Result<Command, ErrorReply> {
    let mut command = match &request.program {
        Program::Argv(argv) => {
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| ErrorReply::new(ErrorKind::BadRequest, "empty argv"))?;
            let mut command = Command::new(program);
            command.args(args);
            command
        }
        Program::Shell(script) => {
            let mut command = Command::new("/bin/sh");
            command.arg("-c").arg(script);
            command
        }
    };
    if request.clear_env {
        command.env_clear().env("PATH", DEFAULT_PATH);
    } else if std::env::var_os("PATH").is_none() {
        // PID 1 gets no PATH from the kernel; give processes the usual one.
        command.env("PATH", DEFAULT_PATH);
    }
    let mut home = None;
    let mut groups = Vec::new();
    if let Some(user) = request.user
        && let Ok(Some(entry)) = User::from_uid(Uid::from_raw(user.uid))
    {
        command
            .env("HOME", &entry.dir)
            .env("USER", &entry.name)
            .env("LOGNAME", &entry.name);
        groups = supplementary_groups(&entry.name, user.gid);
        home = Some(entry.dir);
    }
    command.envs(&request.env as &BTreeMap<String, String>);
    let cwd = match &request.cwd {
        Some(cwd) => {
            check_cwd(Path::new(cwd))?;
            Path::new(cwd).to_owned()
        }
        None => home
            .filter(|home| home.is_dir())
            .unwrap_or_else(|| "/".into()),
    };
    match request.user {
        Some(user) => switch_user(&mut command, user, groups, &cwd)?,
        None => {
            command.current_dir(cwd);
        }
    }
    command
        .process_group(0)
        .stdin(if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(command)
}

/// The user's groups from `/etc/group` (with `gid` first); just `gid` if they cannot be read.
fn supplementary_groups(name: &str, gid: u32) -> Vec<libc::gid_t> {
    let primary = Gid::from_raw(gid);
    let listed = std::ffi::CString::new(name)
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, primary).ok())
        .unwrap_or_default();
    let mut groups = vec![gid];
    groups.extend(listed.iter().map(|g| g.as_raw()).filter(|&g| g != gid));
    groups
}

/// Makes the child take the user's groups, gid and uid, then enter `cwd` as that user (so a
/// directory the user may not enter is refused, as a login would be). Std's `uid`/`gid` would
/// drop supplementary groups instead of setting them, and its `groups` is unstable.
fn switch_user(
    command: &mut Command,
    user: UserSpec,
    groups: Vec<libc::gid_t>,
    cwd: &Path,
) -> Result<(), ErrorReply> {
    let cwd = std::ffi::CString::new(cwd.as_os_str().as_encoded_bytes()).map_err(|_| {
        ErrorReply::new(
            ErrorKind::BadRequest,
            "working directory contains a NUL byte",
        )
    })?;
    let (uid, gid) = (user.uid, user.gid);
    let check = |result: libc::c_int| {
        if result == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the closure runs in the forked child before exec. It only makes the
    // async-signal-safe setgroups/setgid/setuid/chdir system calls on data prepared before the
    // fork (no allocation, no locks), as std itself does for `Command::uid`.
    unsafe {
        command.pre_exec(move || {
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            check(libc::chdir(cwd.as_ptr()))
        });
    }
    Ok(())
}

fn check_cwd(cwd: &Path) -> Result<(), ErrorReply> {
    if !cwd.is_absolute() {
        return Err(ErrorReply::new(
            ErrorKind::BadRequest,
            format!(
                "working directory {} is not an absolute path",
                cwd.display()
            ),
        ));
    }
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ErrorReply::new(
            ErrorKind::NotADirectory,
            format!("working directory {} is not a directory", cwd.display()),
        )),
        Err(e) => Err(super::connection::io_error(
            &format!("working directory {}", cwd.display()),
            &e,
        )),
    }
}

fn program_name(program: &Program) -> String {
    match program {
        Program::Argv(argv) => argv.first().cloned().unwrap_or_default(),
        Program::Shell(_) => "/bin/sh".into(),
    }
}

fn spawn_error(program: &str, error: &std::io::Error) -> ErrorReply {
    let kind = if error.kind() == std::io::ErrorKind::InvalidInput {
        ErrorKind::BadRequest
    } else {
        ErrorKind::SpawnFailed
    };
    ErrorReply::new(kind, format!("cannot start `{program}`: {error}"))
}

fn internal(error: &dyn std::error::Error) -> ErrorReply {
    ErrorReply::new(ErrorKind::Io, super::connection::chain(error))
}

fn take_pipe(fd: Option<OwnedFd>) -> Result<pipe::Receiver, ErrorReply> {
    let fd = fd.ok_or_else(|| ErrorReply::new(ErrorKind::Io, "output pipe missing"))?;
    pipe::Receiver::from_owned_fd(fd).map_err(|e| internal(&e))
}

/// The next chunk of a pipe, or `None` at its end (or on a read error). A missing pipe never
/// yields, so `select!` can keep the branch.
async fn read_chunk(pipe: Option<&mut pipe::Receiver>, buf: &mut BytesMut) -> Option<Bytes> {
    let Some(pipe) = pipe else {
        return std::future::pending().await;
    };
    buf.reserve(MAX_CHUNK_LEN);
    let mut limited = (&mut *pipe).take(u64::try_from(MAX_CHUNK_LEN).unwrap_or(u64::MAX));
    match limited.read_buf(buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(buf.split().freeze()),
    }
}

/// Room for one more stdin chunk; `None` once the writer is gone.
async fn reserve(tx: Option<mpsc::Sender<Bytes>>) -> Option<mpsc::OwnedPermit<Bytes>> {
    tx?.reserve_owned().await.ok()
}

async fn send_data(conn: &mut Conn, kind: StreamKind, bytes: Bytes) -> Result<(), ErrorReply> {
    use futures::SinkExt;
    conn.send(Frame::<AgentMessage>::Data(kind, bytes))
        .await
        .map_err(|e| ErrorReply::new(ErrorKind::Io, format!("sending to the client: {e}")))
}

async fn write_stdin(mut pipe: pipe::Sender, mut chunks: mpsc::Receiver<Bytes>) {
    while let Some(chunk) = chunks.recv().await {
        if pipe.write_all(&chunk).await.is_err() {
            return; // the process closed its stdin
        }
    }
}

fn exit_status(status: WaitStatus) -> ExitStatus {
    match status {
        WaitStatus::Exited(_, code) => ExitStatus {
            code: Some(code),
            signal: None,
        },
        WaitStatus::Signaled(_, signal, _) => ExitStatus {
            code: None,
            signal: Some(signal as i32),
        },
        _ => ExitStatus {
            code: None,
            signal: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(program: Program) -> ExecRequest {
        ExecRequest {
            program,
            env: BTreeMap::new(),
            clear_env: false,
            cwd: None,
            user: None,
            stdin: false,
        }
    }

    #[test]
    fn empty_argv_and_relative_or_missing_cwd_are_refused() {
        let error = build_command(&request(Program::Argv(vec![]))).unwrap_err();
        assert_eq!(error.kind, ErrorKind::BadRequest);
        let mut relative = request(Program::Shell("true".into()));
        relative.cwd = Some("tmp".into());
        assert_eq!(
            build_command(&relative).unwrap_err().kind,
            ErrorKind::BadRequest
        );
        let mut missing = request(Program::Shell("true".into()));
        missing.cwd = Some("/nonexistent/dir".into());
        let error = build_command(&missing).unwrap_err();
        assert_eq!(error.kind, ErrorKind::NotFound);
        assert!(error.message.contains("/nonexistent/dir"), "{error}");
        let mut file = request(Program::Shell("true".into()));
        file.cwd = Some("/proc/self/status".into());
        assert_eq!(
            build_command(&file).unwrap_err().kind,
            ErrorKind::NotADirectory
        );
    }

    #[test]
    fn user_sets_home_and_groups() {
        let mut as_root = request(Program::Argv(vec!["true".into()]));
        as_root.user = Some(UserSpec { uid: 0, gid: 0 });
        as_root.clear_env = true;
        let command = build_command(&as_root).unwrap();
        let envs: BTreeMap<_, _> = command
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
            .collect();
        assert_eq!(
            envs[std::ffi::OsStr::new("USER")].as_deref(),
            Some(std::ffi::OsStr::new("root"))
        );
        assert!(envs.contains_key(std::ffi::OsStr::new("PATH")));
        // The directory is entered after the user switch, in the child.
        assert_eq!(command.get_current_dir(), None);
        assert_eq!(supplementary_groups("root", 0)[0], 0);
        assert_eq!(supplementary_groups("no-such-user", 7), vec![7]);
    }
}
