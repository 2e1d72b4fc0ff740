//! Where a tunnel stream goes: the [`Splicer`] trait, and [`TcpSplicer`] for sandboxes
//! reachable at an IP address (tests use 127.0.0.1).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use roost_proto::SandboxId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Why a splicer could not connect a stream. The first two are answers the gateway turns into
/// the E2B "sandbox not found" / "port is not open" errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpliceError {
    #[error("no such sandbox on this worker")]
    SandboxNotFound,
    #[error("nothing listens on that port in the sandbox")]
    PortClosed,
    #[error("{0}")]
    Failed(String),
}

/// Connects a tunnel stream to a port in one of this worker's sandboxes. The worker's own
/// sandbox table is the only authority: a header naming a sandbox that is not there is
/// [`SpliceError::SandboxNotFound`], whatever the gateway believed.
pub trait Splicer: Send + Sync + 'static {
    /// The connected byte stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn open(
        &self,
        sandbox_id: &SandboxId,
        port: u16,
    ) -> impl Future<Output = Result<Self::Stream, SpliceError>> + Send;
}

/// Sandboxes reachable over TCP at an IP address of their own: `open` connects to
/// `(address, port)`. With every sandbox at 127.0.0.1 it splices into local servers, which is
/// how the tunnel is tested without VMs.
#[derive(Debug)]
pub struct TcpSplicer {
    sandboxes: RwLock<HashMap<SandboxId, IpAddr>>,
    connect_timeout: Duration,
}

impl Default for TcpSplicer {
    fn default() -> Self {
        Self {
            sandboxes: RwLock::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl TcpSplicer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `sandbox_id` to `address` (replacing any previous address).
    pub fn insert(&self, sandbox_id: SandboxId, address: IpAddr) {
        self.sandboxes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sandbox_id, address);
    }

    pub fn remove(&self, sandbox_id: &SandboxId) {
        self.sandboxes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sandbox_id);
    }

    fn address(&self, sandbox_id: &SandboxId) -> Option<IpAddr> {
        self.sandboxes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sandbox_id)
            .copied()
    }
}

impl Splicer for TcpSplicer {
    type Stream = TcpStream;

    async fn open(&self, sandbox_id: &SandboxId, port: u16) -> Result<TcpStream, SpliceError> {
        let ip = self
            .address(sandbox_id)
            .ok_or(SpliceError::SandboxNotFound)?;
        let target = SocketAddr::new(ip, port);
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => {
                // Small writes (WebSocket frames, interactive protocols) go out at once.
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Err(SpliceError::PortClosed)
            }
            Ok(Err(e)) => Err(SpliceError::Failed(format!(
                "cannot connect to port {port}: {e}"
            ))),
            Err(_) => Err(SpliceError::Failed(format!(
                "no answer from port {port} within {:?}",
                self.connect_timeout
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_sandboxes_and_closed_ports_are_told_apart() {
        let splicer = TcpSplicer::new();
        let id: SandboxId = "cl-tcp1".parse().unwrap();
        assert_eq!(
            splicer.open(&id, 80).await.unwrap_err(),
            SpliceError::SandboxNotFound
        );
        splicer.insert(id.clone(), IpAddr::from([127, 0, 0, 1]));
        // A port that was just free: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(
            splicer.open(&id, port).await.unwrap_err(),
            SpliceError::PortClosed
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().port();
        assert!(splicer.open(&id, open).await.is_ok());
        splicer.remove(&id);
        assert_eq!(
            splicer.open(&id, open).await.unwrap_err(),
            SpliceError::SandboxNotFound
        );
    }
}
