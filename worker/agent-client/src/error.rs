//! Errors of the client. The agent's own refusals keep their [`ErrorKind`] so callers can act
//! on them (a missing file, a closed port) without matching strings.

use std::io;
use std::path::PathBuf;

use roost_proto::agent::muxer::HandshakeError;
use roost_proto::agent::{ErrorKind, ErrorReply, FrameError};

/// An operation on the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock handshake with {} failed", path.display())]
    Handshake {
        path: PathBuf,
        #[source]
        source: HandshakeError,
    },
    #[error("no vsock handshake reply from {} within the timeout", path.display())]
    HandshakeTimeout { path: PathBuf },
    #[error("talking to the agent failed")]
    Frame(#[from] FrameError),
    #[error("talking to the agent failed")]
    Io(#[from] io::Error),
    /// The agent answered with an error.
    #[error("the agent refused: {0}")]
    Agent(ErrorReply),
    #[error("the agent sent {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
    #[error("the agent closed the connection before {0}")]
    Closed(&'static str),
    /// envd's `/init` answered, but not with success.
    #[error("envd refused POST /init with HTTP {status}: {body}")]
    InitRejected { status: u16, body: String },
    /// envd's answer to `/init` was not a readable HTTP response.
    #[error("bad HTTP response from envd's /init: {0}")]
    InitResponse(String),
}

impl Error {
    /// The agent's error class, when the agent refused.
    pub fn agent_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Agent(reply) => Some(reply.kind),
            _ => None,
        }
    }
}

/// Waiting for the agent's hello failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent did not announce itself within {0:?}")]
    Timeout(std::time::Duration),
    #[error("reading the agent's hello failed")]
    Read(#[source] Error),
    #[error("the agent speaks protocol versions {min} to {max}, this worker {ours}: incompatible")]
    Incompatible { min: u32, max: u32, ours: u32 },
}
