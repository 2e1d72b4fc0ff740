//! Port forwarding: connect to `127.0.0.1:PORT` inside the guest, or to the envd API's private
//! init socket, answer `Connected`, then splice raw bytes both ways until either side closes.
//!
//! The init socket's path comes from the agent's configuration, never from the request, so a
//! client can reach that one socket and no other Unix socket in the guest.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use roost_proto::agent::{AgentMessage, ErrorKind, ErrorReply, ForwardRequest};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::connection::{Conn, fail, io_error, send};

/// How long connecting to the guest port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(request: ForwardRequest, conn: Conn, envd_init_socket: &Path) {
    match request {
        ForwardRequest::Tcp { port } => match connect_tcp(port).await {
            Ok(tcp) => splice(conn, tcp).await,
            Err(reply) => fail(conn, reply).await,
        },
        ForwardRequest::EnvdInit => match connect_envd_init(envd_init_socket).await {
            Ok(unix) => splice(conn, unix).await,
            Err(reply) => fail(conn, reply).await,
        },
    }
}

/// Answers `Connected`, then copies bytes both ways between the client and `target`.
async fn splice<T: AsyncRead + AsyncWrite + Unpin>(mut conn: Conn, mut target: T) {
    if send(&mut conn, AgentMessage::Connected).await.is_err() {
        return;
    }
    // From here on the connection carries raw bytes. Whatever the client sent right after its
    // request (before waiting for `Connected`) is already in the frame reader's buffer.
    let parts = conn.into_parts();
    let mut io = parts.io;
    if !parts.read_buf.is_empty() && target.write_all(&parts.read_buf).await.is_err() {
        return;
    }
    // Errors here are either side hanging up; the splice is over either way.
    let _ = tokio::io::copy_bidirectional(&mut io, &mut target).await;
}

async fn connect_tcp(port: u16) -> Result<TcpStream, ErrorReply> {
    if port == 0 {
        return Err(ErrorReply::new(ErrorKind::BadRequest, "port 0"));
    }
    let target = (Ipv4Addr::LOCALHOST, port);
    let what = format!("127.0.0.1:{port} in the guest");
    let tcp = with_timeout(&what, TcpStream::connect(target)).await?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A missing socket (envd not started, or started without one) is `not_found`; envd not
/// accepting on it is `connection_refused`.
async fn connect_envd_init(path: &Path) -> Result<UnixStream, ErrorReply> {
    let what = format!("the envd init socket {}", path.display());
    with_timeout(&what, UnixStream::connect(path)).await
}

async fn with_timeout<T>(
    what: &str,
    connect: impl Future<Output = std::io::Result<T>>,
) -> Result<T, ErrorReply> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(io_error(&format!("cannot connect to {what}"), &e)),
        Err(_) => Err(ErrorReply::new(
            ErrorKind::Io,
            format!(
                "connecting to {what} timed out after {} s",
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}
