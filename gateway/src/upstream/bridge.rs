//! Lets Pingora pool tunnel streams.
//!
//! Pingora reuses an upstream connection only if it has a file descriptor whose peer address
//! matches the peer's, so a QUIC stream handed over directly (a "virtual socket") is used once
//! and every request pays a new stream, a new connection inside the sandbox and a round trip
//! to the worker. The bridge gives each tunnel stream a real descriptor: Pingora's connector
//! ([`BridgeConnector`]) connects to a Unix socket private to this process, names the target in
//! a short preamble, and the bridge's accept loop ([`Bridge`], a background service) dials the
//! tunnel and splices the two. Pingora then keeps the Unix connection — and with it the tunnel
//! stream and the sandbox server's keep-alive connection — in its pool, keyed per target.
//!
//! The socket lives in a fresh 0700 directory and the bridge serves only connections from its
//! own process (peer credentials), so it is not a way around the gateway's access checks.
//!
//! Preamble (connector → bridge): worker id (u8 length + bytes), sandbox id (u8 length +
//! bytes), port (u16 BE). Reply: one status byte ([`STATUS_OK`] or a failure code), then
//! for [`STATUS_BROKEN`] a u16 BE length and a UTF-8 reason. After OK, raw bytes both ways.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr as L4Addr;
use pingora::protocols::l4::stream::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::{Error, ErrorType};
use roost_proto::ids::SandboxId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::{DialError, SandboxDialer};

const STATUS_OK: u8 = 0;
const STATUS_NO_WORKER: u8 = 1;
const STATUS_SANDBOX_NOT_FOUND: u8 = 2;
const STATUS_PORT_CLOSED: u8 = 3;
const STATUS_BROKEN: u8 = 4;
/// Longest wait for a connector's preamble (it is written right after connecting).
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bridge could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot create the bridge directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
}

/// The bridge's private directory; dropping it removes the socket and the directory. Held by
/// whoever runs the server, so it goes when the server stops (Pingora may keep its services
/// alive until the process exits).
#[derive(Debug)]
pub struct BridgeDir {
    dir: PathBuf,
    path: PathBuf,
}

impl Drop for BridgeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Prefix of bridge directories in the temporary directory: `<prefix><pid>-<random>`.
const DIR_PREFIX: &str = "roost-gateway-";

/// Removes bridge directories left by gateway processes that no longer exist (killed with
/// SIGKILL, say).
fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let dir = entry.path();
            let _ = std::fs::remove_file(dir.join(SOCKET_NAME));
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

const SOCKET_NAME: &str = "bridge.sock";

/// The accept side: a background service splicing bridge connections into tunnel streams.
pub struct Bridge {
    path: PathBuf,
    listener: Mutex<Option<std::os::unix::net::UnixListener>>,
    dialer: Arc<dyn SandboxDialer>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// Binds the socket in a new private directory under the system's temporary directory
    /// (removing those of dead gateway processes first).
    pub fn bind(dialer: Arc<dyn SandboxDialer>) -> Result<(Self, BridgeDir), BridgeError> {
        remove_stale_dirs(&std::env::temp_dir());
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| {
            BridgeError::Dir(std::env::temp_dir(), std::io::Error::other(e.to_string()))
        })?;
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            hex::encode(random)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| BridgeError::Dir(dir.clone(), e))?;
        let path = dir.join(SOCKET_NAME);
        // From here on the directory is removed on every path, errors included.
        let guard = BridgeDir {
            dir,
            path: path.clone(),
        };
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| BridgeError::Listen(path.clone(), e))?;
        let bridge = Self {
            path,
            listener: Mutex::new(Some(listener)),
            dialer,
        };
        Ok((bridge, guard))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl BackgroundService for Bridge {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let listener = match UnixListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "the tunnel bridge cannot listen; sandbox traffic fails");
                return;
            }
        };
        let own_pid = i32::try_from(std::process::id()).ok();
        loop {
            let conn = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.changed() => return,
            };
            let Ok((conn, _)) = conn else { continue };
            // Only this process's connector may use the bridge.
            if conn.peer_cred().ok().and_then(|c| c.pid()) != own_pid {
                continue;
            }
            let dialer = self.dialer.clone();
            tokio::spawn(async move {
                let _ = splice(conn, dialer).await;
            });
        }
    }
}

async fn splice(mut conn: UnixStream, dialer: Arc<dyn SandboxDialer>) -> std::io::Result<()> {
    let (worker, sandbox, port) =
        match tokio::time::timeout(PREAMBLE_TIMEOUT, read_preamble(&mut conn)).await {
            Ok(Ok(target)) => target,
            _ => return Ok(()),
        };
    let mut upstream = match dialer.dial(&worker, &sandbox, port).await {
        Ok(stream) => stream,
        Err(error) => {
            let (code, reason) = match &error {
                DialError::NoWorker(_) => (STATUS_NO_WORKER, String::new()),
                DialError::SandboxNotFound => (STATUS_SANDBOX_NOT_FOUND, String::new()),
                DialError::PortClosed => (STATUS_PORT_CLOSED, String::new()),
                DialError::Broken(reason) => (STATUS_BROKEN, reason.clone()),
            };
            let reason = &reason.as_bytes()[..reason.len().min(1024)];
            let mut reply = vec![code];
            reply.extend_from_slice(&u16::try_from(reason.len()).unwrap_or(0).to_be_bytes());
            reply.extend_from_slice(reason);
            return conn.write_all(&reply).await;
        }
    };
    conn.write_all(&[STATUS_OK, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut conn, &mut upstream)
        .await
        .map(|_| ())
}

async fn read_preamble(conn: &mut UnixStream) -> std::io::Result<(String, SandboxId, u16)> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let worker = read_short(conn).await?;
    let worker = String::from_utf8(worker).map_err(|_| invalid("worker id"))?;
    let sandbox = read_short(conn).await?;
    let sandbox = std::str::from_utf8(&sandbox)
        .ok()
        .and_then(|s| s.parse::<SandboxId>().ok())
        .ok_or_else(|| invalid("sandbox id"))?;
    let port = conn.read_u16().await?;
    Ok((worker, sandbox, port))
}

async fn read_short(conn: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let len = conn.read_u8().await?;
    let mut buf = vec![0; usize::from(len)];
    conn.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Pingora's side: connects to the bridge for one target. The failure of the last attempt is
/// kept for the proxy to turn into the contract's reply.
pub struct BridgeConnector {
    path: PathBuf,
    worker: String,
    sandbox: SandboxId,
    port: u16,
    failure: Mutex<Option<DialError>>,
}

impl std::fmt::Debug for BridgeConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeConnector")
            .field("worker", &self.worker)
            .field("sandbox", &self.sandbox)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl BridgeConnector {
    pub fn new(path: &Path, worker: &str, sandbox: &SandboxId, port: u16) -> Self {
        Self {
            path: path.to_owned(),
            worker: worker.to_owned(),
            sandbox: sandbox.clone(),
            port,
            failure: Mutex::new(None),
        }
    }

    /// Why the last connect failed, if the worker or tunnel said so.
    pub fn take_failure(&self) -> Option<DialError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn open(&self) -> Result<UnixStream, DialError> {
        let broken = |e: std::io::Error| DialError::Broken(format!("tunnel bridge: {e}"));
        let worker = u8::try_from(self.worker.len())
            .map_err(|_| DialError::NoWorker(self.worker.clone()))?;
        let sandbox =
            u8::try_from(self.sandbox.as_str().len()).map_err(|_| DialError::SandboxNotFound)?;
        let mut preamble = Vec::with_capacity(4 + self.worker.len() + self.sandbox.as_str().len());
        preamble.push(worker);
        preamble.extend_from_slice(self.worker.as_bytes());
        preamble.push(sandbox);
        preamble.extend_from_slice(self.sandbox.as_str().as_bytes());
        preamble.extend_from_slice(&self.port.to_be_bytes());
        let mut conn = UnixStream::connect(&self.path).await.map_err(broken)?;
        conn.write_all(&preamble).await.map_err(broken)?;
        let code = conn.read_u8().await.map_err(broken)?;
        let len = conn.read_u16().await.map_err(broken)?;
        let mut reason = vec![0; usize::from(len)];
        conn.read_exact(&mut reason).await.map_err(broken)?;
        match code {
            STATUS_OK => Ok(conn),
            STATUS_NO_WORKER => Err(DialError::NoWorker(self.worker.clone())),
            STATUS_SANDBOX_NOT_FOUND => Err(DialError::SandboxNotFound),
            STATUS_PORT_CLOSED => Err(DialError::PortClosed),
            _ => Err(DialError::Broken(
                String::from_utf8_lossy(&reason).into_owned(),
            )),
        }
    }
}

#[async_trait]
impl L4Connect for BridgeConnector {
    async fn connect(&self, _addr: &L4Addr) -> pingora::Result<Stream> {
        match self.open().await {
            Ok(conn) => Ok(Stream::from(conn)),
            Err(error) => {
                let message = error.to_string();
                *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
                let mut error = Error::explain(ErrorType::ConnectError, message);
                // The worker's answer is definite; a broken tunnel is not retried either
                // (the request may not be idempotent).
                error.set_retry(false);
                Err(error)
            }
        }
    }
}
