//! Port forwarding: connect to `127.0.0.1:PORT` inside the guest, answer `Connected`, then
//! splice raw bytes both ways until either side closes.

use std::net::Ipv4Addr;
use std::time::Duration;

use roost_proto::agent::{AgentMessage, ErrorKind, ErrorReply, ForwardRequest};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::connection::{Conn, fail, io_error, send};

/// How long connecting to the guest port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(request: ForwardRequest, mut conn: Conn) {
    let mut tcp = match connect(request.port).await {
        Ok(tcp) => tcp,
        Err(reply) => return fail(conn, reply).await,
    };
    if send(&mut conn, AgentMessage::Connected).await.is_err() {
        return;
    }
    // From here on the connection carries raw bytes. Whatever the client sent right after its
    // request (before waiting for `Connected`) is already in the frame reader's buffer.
    let parts = conn.into_parts();
    let mut io = parts.io;
    if !parts.read_buf.is_empty() && tcp.write_all(&parts.read_buf).await.is_err() {
        return;
    }
    // Errors here are either side hanging up; the splice is over either way.
    let _ = tokio::io::copy_bidirectional(&mut io, &mut tcp).await;
}

async fn connect(port: u16) -> Result<TcpStream, ErrorReply> {
    if port == 0 {
        return Err(ErrorReply::new(ErrorKind::BadRequest, "port 0"));
    }
    let target = (Ipv4Addr::LOCALHOST, port);
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return Err(io_error(
                &format!("cannot connect to 127.0.0.1:{} in the guest", port),
                &e,
            ));
        }
        Err(_) => {
            return Err(ErrorReply::new(
                ErrorKind::Io,
                format!(
                    "connecting to 127.0.0.1:{} timed out after {} s",
                    port,
                    CONNECT_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}
