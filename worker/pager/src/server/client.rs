//! The VMM's end of the page server: register guest RAM with a userfaultfd, hand it over, and
//! watch the connection.
//!
//! The VMM keeps its own copy of the userfaultfd for the VM's life. That matters: if every copy
//! were closed when the server dies, the kernel would unregister the ranges and later faults
//! would silently read zero pages — corrupted memory instead of an error. With the VMM's copy
//! open, a thread that faults after the server died stays blocked, and the watchdog ends the VM:
//! first through the VMM's normal exit path (`on_lost`), then, if threads stuck in faults keep
//! the process from ending within a grace period, by exiting the process outright.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use userfaultfd::{IoctlFlags, Uffd, UffdBuilder};

use super::protocol::{self, Handshake, PROTOCOL_VERSION, ProtocolError, Region, Reply};

/// Why guest RAM could not be handed to a page server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "could not create a userfaultfd (needs access to /dev/userfaultfd, or vm.unprivileged_userfaultfd=1, or CAP_SYS_PTRACE)"
    )]
    Create(#[source] userfaultfd::Error),
    #[error("could not register guest RAM with the userfaultfd")]
    Register(#[source] userfaultfd::Error),
    #[error("the userfaultfd lacks the copy/zeropage/wake operations")]
    MissingIoctls,
    #[error("could not connect to the page server at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("page server handshake failed")]
    Handshake(#[from] ProtocolError),
}

/// The page server went away or failed; `message` says why, for the VM's exit reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagerLost {
    pub message: String,
}

/// One RAM region to register: host address, length, and its byte offset in the chain.
#[derive(Debug, Clone, Copy)]
pub struct RamRegion {
    pub host: *mut u8,
    pub len: usize,
    pub chain_offset: u64,
}

/// A live connection to the page server serving this process's guest RAM.
#[derive(Debug)]
pub struct PagerLink {
    stream: UnixStream,
    _uffd: Uffd,
    stopping: Arc<AtomicBool>,
}

impl PagerLink {
    /// Registers `regions` with a new userfaultfd and hands it to the page server listening at
    /// `socket`, which must serve the chain with header `header_sha256`. Fails if the server
    /// does not accept within `timeout`.
    ///
    /// Nothing may touch the regions before this returns (a fault would have no server).
    pub fn connect(
        socket: &Path,
        regions: &[RamRegion],
        page_size: u32,
        header_sha256: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(ClientError::Create)?;
        for r in regions {
            let ioctls = uffd
                .register(r.host.cast(), r.len)
                .map_err(ClientError::Register)?;
            if !ioctls.contains(IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE) {
                return Err(ClientError::MissingIoctls);
            }
        }
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?;
        let handshake = Handshake {
            version: PROTOCOL_VERSION,
            page_size,
            header_sha256: header_sha256.to_owned(),
            regions: regions
                .iter()
                .map(|r| Region {
                    host_addr: r.host as u64,
                    len: r.len as u64,
                    chain_offset: r.chain_offset,
                })
                .collect(),
        };
        protocol::send_handshake(&stream, &handshake, uffd.as_raw_fd())?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(ProtocolError::Io)?;
        let mut reader = BufReader::new(&stream);
        protocol::recv_reply(&mut reader)?;
        stream.set_read_timeout(None).map_err(ProtocolError::Io)?;
        Ok(Self {
            stream,
            _uffd: uffd,
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts the watchdog thread: when the server closes the connection or reports a failure,
    /// `on_lost` runs once (it should stop the VM). If `hard_exit` is `Some((grace, code))` and
    /// the process is still alive `grace` later — vCPU threads blocked in faults cannot be
    /// joined — the process exits with `code`. Dropping the link stops the watchdog silently.
    pub fn watch(
        &self,
        on_lost: impl FnOnce(PagerLost) + Send + 'static,
        hard_exit: Option<(Duration, i32)>,
    ) -> std::io::Result<()> {
        let stream = self.stream.try_clone()?;
        let stopping = self.stopping.clone();
        std::thread::Builder::new()
            .name("pager-watchdog".into())
            .spawn(move || {
                let lost = wait_for_loss(stream);
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                tracing::error!(reason = %lost.message, "page server lost; failing the VM");
                on_lost(lost.clone());
                if let Some((grace, code)) = hard_exit {
                    std::thread::sleep(grace);
                    eprintln!(
                        "roost: {}; guest memory can no longer be served",
                        lost.message
                    );
                    // SAFETY: _exit ends the process at once without running destructors,
                    // which is the point: threads blocked in userfaultfd faults would never
                    // let a normal exit finish. The kernel frees every fd and mapping.
                    unsafe { libc::_exit(code) };
                }
            })?;
        Ok(())
    }
}

impl Drop for PagerLink {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Blocks until the server's end closes or sends a failure line.
fn wait_for_loss(stream: UnixStream) -> PagerLost {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                return PagerLost {
                    message: "page server closed the connection (it exited or was killed)".into(),
                };
            }
            Ok(_) => {
                if let Ok(Reply {
                    ok: false,
                    error: Some(e),
                }) = serde_json::from_str::<Reply>(line.trim_end())
                {
                    return PagerLost { message: e };
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return PagerLost {
                    message: format!("page server connection failed: {e}"),
                };
            }
        }
    }
}
