//! Worker side of the worker ↔ agent protocol (`roost_proto::agent`): wait for the agent in a
//! microVM to announce itself, then run processes, move files and forward ports through it, and
//! hand the sandbox its identity (envd's `POST /init`, [`AgentClient::init_sandbox`]; after a
//! snapshot restore the whole identity with entropy and clock, [`AgentClient::set_identity`]).
//!
//! Every operation opens its own connection ([`Connector`]): through the VMM's vsock Unix
//! socket in production, or straight to an agent's Unix socket in tests. Dropping a handle
//! closes its connection, which ends the operation in the guest (an exec's process group is
//! killed).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use roost_agent_client::{AgentClient, Connector, ReadyListener, exec_argv};
//! use std::time::Duration;
//!
//! let ready = ReadyListener::for_vm("/run/roost/vm1/vsock.sock")?; // before booting the VM
//! // ... boot the VM ...
//! let hello = ready.accept_hello(Duration::from_secs(10)).await?;
//! let agent = AgentClient::new(Connector::vm("/run/roost/vm1/vsock.sock"));
//! let output = agent.run(exec_argv(["echo", "hi"])).await?;
//! assert_eq!(output.stdout, b"hi\n");
//! # let _ = hello; Ok(()) }
//! ```

mod connector;
mod envd_init;
mod error;
mod exec;
mod files;
mod forward;
mod identity;
mod ready;

use futures::{SinkExt, StreamExt};
use roost_proto::agent::{AgentMessage, Frame, FrameCodec, Health, Hello, Operation, Request};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

pub use connector::Connector;
pub use error::{Error, ReadyError};
pub use exec::{Exec, ExecEvent, ExecInput, ExecOutput, Output, exec_argv, exec_shell};
pub use files::FileDownload;
pub use ready::ReadyListener;
pub use roost_proto::agent::{
    ErrorKind, ErrorReply, ExecRequest, ExitStatus, IdentityApplied, IdentityRequest, InitRequest,
    Program, UserSpec, WriteFileRequest,
};

/// A connection after its request: agent messages in, client messages out.
type Conn = Framed<UnixStream, FrameCodec<AgentMessage>>;

/// Talks to one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    connector: Connector,
}

impl AgentClient {
    pub fn new(connector: Connector) -> Self {
        Self { connector }
    }

    /// The agent's versions and hostname.
    pub async fn hello(&self) -> Result<Hello, Error> {
        let mut conn = self.open(Operation::Hello).await?;
        match expect(&mut conn, "hello").await? {
            AgentMessage::Hello(hello) => Ok(hello),
            other => Err(unexpected("hello", &other)),
        }
    }

    /// Uptime, load and memory of the guest.
    pub async fn health(&self) -> Result<Health, Error> {
        let mut conn = self.open(Operation::Health).await?;
        match expect(&mut conn, "health").await? {
            AgentMessage::Health(health) => Ok(health),
            other => Err(unexpected("health", &other)),
        }
    }

    /// Opens a connection and sends the request for `op`.
    async fn open(&self, op: Operation) -> Result<Conn, Error> {
        let stream = self.connector.connect().await?;
        let mut conn = Framed::new(stream, FrameCodec::<AgentMessage>::new());
        conn.send(Frame::Message(Request::new(op))).await?;
        Ok(conn)
    }
}

/// The next control message; an agent error becomes [`Error::Agent`].
async fn expect(conn: &mut Conn, expected: &'static str) -> Result<AgentMessage, Error> {
    match conn.next().await {
        None => Err(Error::Closed(expected)),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(Frame::Message(AgentMessage::Error(reply)))) => Err(Error::Agent(reply)),
        Some(Ok(Frame::Message(message))) => Ok(message),
        Some(Ok(Frame::Data(kind, _))) => Err(Error::Unexpected {
            expected,
            got: format!("{kind:?} data"),
        }),
    }
}

fn unexpected(expected: &'static str, got: &AgentMessage) -> Error {
    Error::Unexpected {
        expected,
        got: format!("{got:?}"),
    }
}
