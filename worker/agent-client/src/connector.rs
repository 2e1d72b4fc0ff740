//! Opening a connection to the agent: through the VMM's vsock Unix socket (the `CONNECT`
//! handshake of [`roost_proto::agent::muxer`]), or straight to a Unix socket the agent listens
//! on (an agent run as an ordinary process, in tests).

use std::path::PathBuf;
use std::time::Duration;

use roost_proto::agent::muxer::{self, HandshakeError, MAX_REPLY_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::Error;

/// How long the vsock muxer may take to answer `CONNECT`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the agent is reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connector {
    /// The VMM's vsock Unix socket; connections go to guest vsock `port`.
    VsockMuxer { uds_path: PathBuf, port: u32 },
    /// A Unix socket the agent itself listens on.
    Unix(PathBuf),
}

impl Connector {
    /// The agent in the VM whose vsock device is backed by `uds_path`, on its standard port.
    pub fn vm(uds_path: impl Into<PathBuf>) -> Self {
        Self::VsockMuxer {
            uds_path: uds_path.into(),
            port: roost_proto::agent::AGENT_PORT,
        }
    }

    /// A byte stream to the agent, ready for a request.
    pub async fn connect(&self) -> Result<UnixStream, Error> {
        match self {
            Self::Unix(path) => UnixStream::connect(path)
                .await
                .map_err(|source| Error::Connect {
                    path: path.clone(),
                    source,
                }),
            Self::VsockMuxer { uds_path, port } => {
                let mut stream =
                    UnixStream::connect(uds_path)
                        .await
                        .map_err(|source| Error::Connect {
                            path: uds_path.clone(),
                            source,
                        })?;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, *port)).await {
                    Ok(Ok(_host_port)) => Ok(stream),
                    Ok(Err(HandshakeFailure::Io(source))) => Err(Error::Connect {
                        path: uds_path.clone(),
                        source,
                    }),
                    Ok(Err(HandshakeFailure::Reply(source))) => Err(Error::Handshake {
                        path: uds_path.clone(),
                        source,
                    }),
                    Err(_) => Err(Error::HandshakeTimeout {
                        path: uds_path.clone(),
                    }),
                }
            }
        }
    }
}

#[derive(Debug)]
enum HandshakeFailure {
    Io(std::io::Error),
    Reply(HandshakeError),
}

/// Writes `CONNECT <port>\n` and reads the reply line. Reads byte by byte so that nothing
/// after the line (the agent's first bytes) is consumed.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    port: u32,
) -> Result<u32, HandshakeFailure> {
    stream
        .write_all(muxer::connect_line(port).as_bytes())
        .await
        .map_err(HandshakeFailure::Io)?;
    let mut line = Vec::with_capacity(MAX_REPLY_LEN);
    loop {
        let byte = match stream.read_u8().await {
            Ok(byte) => byte,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // The muxer hangs up when nothing listens on the guest port.
                let so_far = String::from_utf8_lossy(&line).into_owned();
                return Err(HandshakeFailure::Reply(HandshakeError::Refused(so_far)));
            }
            Err(e) => return Err(HandshakeFailure::Io(e)),
        };
        line.push(byte);
        if byte == b'\n' {
            break;
        }
        if line.len() >= MAX_REPLY_LEN {
            let text = String::from_utf8_lossy(&line).into_owned();
            return Err(HandshakeFailure::Reply(HandshakeError::Malformed(text)));
        }
    }
    let text = String::from_utf8_lossy(&line);
    muxer::parse_ok_line(&text).map_err(HandshakeFailure::Reply)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    use super::*;

    /// A fake VMM muxer: checks the `CONNECT` line, answers `reply` (hangs up if empty), then
    /// sends `after` (what the guest would say first).
    async fn fake_muxer(
        reply: &'static [u8],
        after: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1025\n");
            if reply.is_empty() {
                return; // hang up, as a muxer does when nothing listens on the guest port
            }
            stream.get_mut().write_all(reply).await.unwrap();
            stream.get_mut().write_all(after).await.unwrap();
            // Keep the connection open until the client is done.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn ok_reply_leaves_the_guest_bytes_unread() {
        let (_dir, path) = fake_muxer(b"OK 1073741824\n", b"guest says hi").await;
        let mut stream = Connector::vm(&path).connect().await.unwrap();
        let mut first = [0u8; 13];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"guest says hi");
    }

    #[tokio::test]
    async fn refusal_and_garbage_are_handshake_errors() {
        let (_dir, path) = fake_muxer(b"", b"").await;
        let error = Connector::vm(&path).connect().await.unwrap_err();
        assert!(
            matches!(
                error,
                Error::Handshake {
                    source: HandshakeError::Refused(_),
                    ..
                }
            ),
            "{error:?}"
        );
        let (_dir, path) = fake_muxer(b"OK nope\n", b"").await;
        let error = Connector::vm(&path).connect().await.unwrap_err();
        assert!(
            matches!(
                error,
                Error::Handshake {
                    source: HandshakeError::Malformed(_),
                    ..
                }
            ),
            "{error:?}"
        );
        let (_dir, path) = fake_muxer(&[b'x'; 100], b"").await;
        let error = Connector::vm(&path).connect().await.unwrap_err();
        assert!(
            matches!(
                error,
                Error::Handshake {
                    source: HandshakeError::Malformed(_),
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error_naming_the_path() {
        let error = Connector::vm("/nonexistent/vsock.sock")
            .connect()
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/vsock.sock"),
            "{error}"
        );
    }
}
