//! Errors of the tunnel endpoint ([`HubError`]) and of opening one stream ([`TunnelError`]).

use std::net::SocketAddr;
use std::time::Duration;

use roost_proto::SandboxId;
use roost_proto::tls::TlsError;
use roost_proto::tunnel::DecodeError;

/// Why the tunnel endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tunnel secret {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    SecretMode { path: String, mode: u32 },
    #[error("tunnel secret {path} is not {} hex digits; delete it to make a new one", 2 * super::SECRET_LEN)]
    SecretFormat { path: String },
    #[error("the operating system's random source failed")]
    Entropy,
    #[error("cannot set up TLS for the tunnel endpoint")]
    Tls(#[from] TlsError),
    #[error("invalid tunnel transport setting")]
    Transport(#[from] quinn::VarIntBoundsExceeded),
    #[error("cannot bind the tunnel endpoint to {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// Why [`super::TunnelHub::open`] gave no stream. [`Self::NoWorker`], [`Self::SandboxNotFound`]
/// and [`Self::PortClosed`] are definite answers; [`Self::Broken`] means the tunnel failed and
/// a retry (possibly through another route) may succeed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("worker {0} has no tunnel to this gateway")]
    NoWorker(String),
    #[error("worker {worker_id} holds no sandbox {sandbox_id}")]
    SandboxNotFound {
        worker_id: String,
        sandbox_id: SandboxId,
    },
    #[error("port {port} is not open in sandbox {sandbox_id}")]
    PortClosed { sandbox_id: SandboxId, port: u16 },
    #[error("tunnel to worker {worker_id} failed")]
    Broken {
        worker_id: String,
        #[source]
        reason: BrokenReason,
    },
}

/// What went wrong on a broken tunnel.
#[derive(Debug, thiserror::Error)]
pub enum BrokenReason {
    #[error("the connection is gone")]
    Connection(#[from] quinn::ConnectionError),
    #[error("writing the header failed")]
    Write(#[from] quinn::WriteError),
    #[error("the worker's status is unreadable")]
    Status(#[from] DecodeError),
    #[error("no status within {0:?}")]
    Timeout(Duration),
    #[error("the worker could not connect: {0}")]
    Worker(String),
}
