//! How the proxy reaches a sandbox port: a [`SandboxDialer`] opens a byte stream to it (the
//! QUIC tunnel of the hosting worker in production, anything in tests), and
//! [`bridge`] hands such streams to Pingora as poolable connections. The dialer's typed
//! refusals ("sandbox not found", "port not open") reach the proxy, which turns them into the
//! contract's JSON replies rather than a generic connect error.

pub mod bridge;
pub mod tunnel;

use async_trait::async_trait;
use roost_proto::ids::SandboxId;
use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream to a sandbox port; shutdown of the write half is a half-close.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpstreamIo for T {}

/// Why no stream could be opened; decides the client-visible reply.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The worker hosting the sandbox has no tunnel to this gateway (502 sandbox not found).
    #[error("worker {0} has no tunnel to this gateway")]
    NoWorker(String),
    /// The worker does not host this sandbox (502 sandbox not found).
    #[error("the worker does not host the sandbox")]
    SandboxNotFound,
    /// Nothing listens on the port (502 port not open).
    #[error("nothing listens on the port")]
    PortClosed,
    /// The tunnel failed (502).
    #[error("the tunnel broke: {0}")]
    Broken(String),
}

impl DialError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::NoWorker(_) => "no_worker",
            DialError::SandboxNotFound => "sandbox_not_found",
            DialError::PortClosed => "port_closed",
            DialError::Broken(_) => "broken",
        }
    }
}

/// Opens streams to sandbox ports.
#[async_trait]
pub trait SandboxDialer: Send + Sync + 'static {
    async fn dial(
        &self,
        worker_id: &str,
        sandbox: &SandboxId,
        port: u16,
    ) -> Result<Box<dyn UpstreamIo>, DialError>;
}
