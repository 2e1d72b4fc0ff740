//! The API thread: accepts one client at a time on the socket, reads request lines, calls the
//! [`VmController`] and writes reply lines. It waits with `poll` on the listener (or client) and
//! a stop eventfd, so the VM's teardown ends it promptly; the socket file is removed by
//! [`ApiServer::stop`] on the tearing-down thread.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{MAX_LINE, Reply, Request, RunStateName, SnapshotInfo, SnapshotKind};
use crate::vmm::{ControlError, SnapshotMode, VmController};

/// The bound API socket, before the VM runs.
#[derive(Debug)]
pub struct ApiListener {
    listener: UnixListener,
    path: PathBuf,
}

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("could not remove the stale API socket {path}")]
    Stale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("could not listen on the API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ApiListener {
    /// Listens on `path` (a stale socket from a killed VMM is replaced; any other file is not).
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::NotASocket {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ApiError::Stale {
                path: path.to_owned(),
                source,
            })?;
        }
        let bind = |source| ApiError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The running API thread.
#[derive(Debug)]
pub struct ApiServer {
    thread: Option<JoinHandle<()>>,
    stop: EventFd,
    path: PathBuf,
}

impl ApiServer {
    /// Starts the API thread; it installs `filter` first.
    pub fn spawn(
        listener: ApiListener,
        controller: Arc<VmController>,
        filter: Option<BpfProgram>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop = stop.try_clone()?;
        let path = listener.path.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(filter.as_ref()) {
                    tracing::error!(error = %e, "API thread: no seccomp filter; API disabled");
                    return;
                }
                serve(&listener.listener, &controller, &thread_stop);
            })?;
        Ok(Self {
            thread: Some(thread),
            stop,
            path,
        })
    }

    /// Ends the thread, joins it and removes the socket file.
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the API thread panicked");
        }
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the API socket");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `fd` is readable (true) or `stop` is signalled (false).
fn wait_readable(fd: RawFd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

fn serve(listener: &UnixListener, controller: &VmController, stop: &EventFd) {
    while wait_readable(listener.as_raw_fd(), stop) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_client(stream, controller, stop) {
                    tracing::debug!(error = %e, "API client gone");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed");
            }
        }
    }
}

fn serve_client(
    mut stream: UnixStream,
    controller: &VmController,
    stop: &EventFd,
) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let reply = handle_line(&line[..end], controller);
            let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
            out.push(b'\n');
            stream.set_nonblocking(false)?;
            stream.write_all(&out)?;
            stream.set_nonblocking(true)?;
        }
        if buf.len() > MAX_LINE {
            let reply = Reply {
                error: Some(format!("request line longer than {MAX_LINE} bytes")),
                ..Reply::ok(None)
            };
            let reply = Reply { ok: false, ..reply };
            let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
            out.push(b'\n');
            stream.set_nonblocking(false)?;
            return stream.write_all(&out);
        }
        if !wait_readable(stream.as_raw_fd(), stop) {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Why a request line was refused before reaching the VM.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("invalid request")]
    Parse(#[source] serde_json::Error),
    #[error("a diff snapshot needs \"parent\": the previous snapshot's directory")]
    DiffWithoutParent,
    #[error("{0}")]
    Control(#[from] ControlError),
}

fn state(controller: &VmController) -> Option<RunStateName> {
    Some(if controller.is_paused() {
        RunStateName::Paused
    } else {
        RunStateName::Running
    })
}

fn handle_line(line: &[u8], controller: &VmController) -> Reply {
    match handle(line, controller) {
        Ok(reply) => reply,
        Err(RequestError::Control(e)) => Reply::error(&e),
        Err(e) => Reply::error(&e),
    }
}

fn handle(line: &[u8], controller: &VmController) -> Result<Reply, RequestError> {
    let request: Request = serde_json::from_slice(line).map_err(RequestError::Parse)?;
    tracing::debug!(?request, "API request");
    match request {
        Request::Status => Ok(Reply::ok(state(controller))),
        Request::Pause => {
            controller.pause()?;
            Ok(Reply::ok(state(controller)))
        }
        Request::Resume => {
            controller.resume();
            Ok(Reply::ok(state(controller)))
        }
        Request::Snapshot {
            dir,
            kind,
            parent,
            resume,
        } => {
            let control = match (kind, parent) {
                (SnapshotKind::Full, _) => SnapshotMode::Full,
                (SnapshotKind::Diff, Some(parent)) => SnapshotMode::Diff { parent },
                (SnapshotKind::Diff, None) => return Err(RequestError::DiffWithoutParent),
            };
            let summary = controller.snapshot(&dir, &control, resume)?;
            Ok(Reply {
                snapshot: Some(SnapshotInfo {
                    dir: summary.dir,
                    kind,
                    memory_pages_written: summary.memory_pages_written,
                    memory_depth: summary.memory_depth,
                    paused_ms: summary.paused_ms,
                    state_bytes: summary.state_bytes,
                    disk_chain: Some(summary.disk_chain),
                }),
                ..Reply::ok(state(controller))
            })
        }
        Request::Stop => {
            controller.stop();
            Ok(Reply::ok(None))
        }
    }
}
