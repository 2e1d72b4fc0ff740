//! One connection: read the request, check its version, run the operation, and turn every
//! failure into an error frame for the client.

use futures::{SinkExt, StreamExt};
use roost_proto::agent::{
    AgentMessage, ClientMessage, ErrorKind, ErrorReply, Frame, FrameCodec, FrameError,
    MIN_PROTOCOL_VERSION, Operation, PROTOCOL_VERSION, Request,
};
use tokio_util::codec::Framed;

use super::transport::Io;
use super::{exec, files, forward, status};
use crate::identity::IdentityConfig;

/// A connection after its request: client messages in, agent messages out.
pub type Conn = Framed<Box<dyn Io>, FrameCodec<ClientMessage>>;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves one connection to its end. Never panics on client input; errors go to the client.
/// `identity` says where envd's init socket is (a forward to it connects there) and what the
/// identity operation may change.
pub async fn serve(io: Box<dyn Io>, identity: &IdentityConfig) {
    let mut framed = Framed::new(io, FrameCodec::<Request>::new());
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, framed.next()).await {
        Err(_elapsed) => Err(ErrorReply::new(
            ErrorKind::BadRequest,
            format!("no request within {} s", REQUEST_TIMEOUT.as_secs()),
        )),
        Ok(None) => return, // closed without asking anything
        Ok(Some(Ok(Frame::Message(request)))) => Ok(request),
        Ok(Some(Ok(Frame::Data(..)))) => Err(ErrorReply::new(
            ErrorKind::BadRequest,
            "the first frame must be a request",
        )),
        Ok(Some(Err(e))) => Err(frame_error(&e)),
    };
    let mut conn = framed.map_codec(FrameCodec::retype::<ClientMessage>);
    let op = match request.and_then(check_version) {
        Ok(op) => op,
        Err(reply) => return fail(conn, reply).await,
    };
    let result = match op {
        // A forward hands the whole connection over to the splice.
        Operation::Forward(forward) => {
            return forward::run(forward, conn, &identity.envd_init_socket).await;
        }
        Operation::Hello => send(&mut conn, AgentMessage::Hello(status::hello())).await,
        Operation::Health => send(&mut conn, AgentMessage::Health(status::health())).await,
        Operation::Exec(exec) => exec::run(exec, &mut conn).await,
        Operation::ReadFile(read) => files::read(read, &mut conn).await,
        Operation::WriteFile(write) => files::write(write, &mut conn).await,
        Operation::Identity(request) => match crate::identity::apply(request, identity).await {
            Ok(applied) => send(&mut conn, AgentMessage::IdentityApplied(applied)).await,
            Err(reply) => Err(reply),
        },
    };
    match result {
        Ok(()) => linger(conn).await,
        Err(reply) => fail(conn, reply).await,
    }
}

fn check_version(request: Request) -> Result<Operation, ErrorReply> {
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&request.version) {
        Ok(request.op)
    } else {
        Err(ErrorReply::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "protocol version {} requested; this agent speaks {MIN_PROTOCOL_VERSION} to \
                 {PROTOCOL_VERSION}",
                request.version
            ),
        ))
    }
}

/// Sends `reply` as the connection's last frame and closes it.
pub async fn fail(mut conn: Conn, reply: ErrorReply) {
    tracing::debug!(kind = ?reply.kind, "operation failed: {}", reply.message);
    // The client may be gone already; nothing else to do then.
    if conn
        .send(Frame::Message(AgentMessage::Error(reply)))
        .await
        .is_ok()
    {
        linger(conn).await;
    }
}

/// Ends a connection without losing its last frames: shut the write side down, then wait
/// (bounded) for the client to close its side before closing ours. Closing outright can reset
/// the stream and discard what the client has not read yet: with unread input (the rest of an
/// oversized frame, stdin nobody read) a socket close turns into a reset, and the VMM's vsock
/// muxer closes the host stream as soon as the guest socket is closed.
async fn linger(conn: Conn) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER: std::time::Duration = std::time::Duration::from_secs(10);
    let mut io = conn.into_inner();
    if io.shutdown().await.is_err() {
        return;
    }
    let mut sink = vec![0u8; 64 * 1024];
    let drain = async { while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Sends one message. A send failure means the client is gone: it is returned as an error
/// reply that will fail to send too, which ends the connection.
pub async fn send(conn: &mut Conn, message: AgentMessage) -> Result<(), ErrorReply> {
    conn.send(Frame::Message(message))
        .await
        .map_err(|e| ErrorReply::new(ErrorKind::Io, format!("sending to the client: {e}")))
}

/// The reply for a frame the client sent that could not be read.
pub fn frame_error(error: &FrameError) -> ErrorReply {
    let kind = match error {
        FrameError::TooLarge { .. } => ErrorKind::FrameTooLarge,
        FrameError::Io(_) => ErrorKind::Io,
        FrameError::Empty
        | FrameError::UnknownTag(_)
        | FrameError::Truncated(_)
        | FrameError::BadMessage(_) => ErrorKind::BadRequest,
    };
    ErrorReply::new(kind, chain(error))
}

/// An error and its causes on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Maps an I/O error about `what` to an error reply of the matching kind.
pub fn io_error(what: &str, error: &std::io::Error) -> ErrorReply {
    use std::io::ErrorKind as Io;
    let kind = match error.kind() {
        Io::NotFound => ErrorKind::NotFound,
        Io::PermissionDenied | Io::ReadOnlyFilesystem => ErrorKind::PermissionDenied,
        Io::IsADirectory => ErrorKind::IsADirectory,
        Io::NotADirectory => ErrorKind::NotADirectory,
        Io::ConnectionRefused => ErrorKind::ConnectionRefused,
        _ => ErrorKind::Io,
    };
    ErrorReply::new(kind, format!("{what}: {error}"))
}
