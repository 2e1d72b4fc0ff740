//! `POST /init` to a private Unix socket inside the guest: envd's (the same request the worker
//! can send through a forward, so identity and `/init` share one code path in envd) and the code
//! interpreter's admin socket (which takes the access token from the same body).
//!
//! hyper's HTTP/1 client connection, already in the agent for envd's server side, does the
//! exchange; no connection pool or client stack is needed for one request on a local socket.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use roost_proto::agent::{ErrorKind, ErrorReply, InitRequest};
use tokio::net::UnixStream;

/// How long the whole exchange may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer body kept for an error message.
const MAX_ERROR_BODY: usize = 4096;

/// Posting failed.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange on {path} failed")]
    Http {
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{path} answered HTTP {status}: {body}")]
    Refused {
        path: String,
        status: u16,
        body: String,
    },
    #[error("{path} did not answer within {} s", TIMEOUT.as_secs())]
    Timeout { path: String },
}

impl PostError {
    /// The channel's error reply: a refusal is the request's fault (`bad_request`), a missing
    /// socket `not_found`, anything else `io`.
    pub fn reply(&self, who: &str) -> ErrorReply {
        let kind = match self {
            Self::Refused { status, .. } if (400..500).contains(status) => ErrorKind::BadRequest,
            Self::Connect { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            _ => ErrorKind::Io,
        };
        ErrorReply::new(kind, format!("{who}: {}", chain(self)))
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Sends `request` as `POST /init` to the HTTP server on `socket`; success is any 2xx.
pub async fn post_init(socket: &Path, request: &InitRequest) -> Result<(), PostError> {
    let path = socket.display().to_string();
    match tokio::time::timeout(TIMEOUT, post(socket, request)).await {
        Ok(result) => result,
        Err(_) => Err(PostError::Timeout { path }),
    }
}

async fn post(socket: &Path, request: &InitRequest) -> Result<(), PostError> {
    let path = socket.display().to_string();
    let http = |source| PostError::Http {
        path: path.clone(),
        source,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| PostError::Connect {
            path: path.clone(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(connection);
    // Serialising our own struct of strings cannot fail.
    let body = serde_json::to_vec(request).unwrap_or_default();
    let post = hyper::Request::post("/init")
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| PostError::Refused {
            path: path.clone(),
            status: 0,
            body: e.to_string(),
        })?;
    let result = async {
        let response = sender.send_request(post).await.map_err(http)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        if status.is_success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)]);
        Err(PostError::Refused {
            path: path.clone(),
            status: status.as_u16(),
            body: text.trim().to_owned(),
        })
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot server on a Unix socket: reads one request, answers `reply`.
    async fn serve_once(
        reply: &'static str,
    ) -> (tempfile::TempDir, tokio::task::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"}") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            stream.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8(got).unwrap()
        });
        (dir, server)
    }

    #[tokio::test]
    async fn posts_json_and_takes_a_2xx() {
        let (dir, server) = serve_once("HTTP/1.1 204 No Content\r\n\r\n").await;
        let request = InitRequest {
            access_token: Some("t".into()),
            ..InitRequest::default()
        };
        post_init(&dir.path().join("s"), &request).await.unwrap();
        let sent = server.await.unwrap();
        assert!(sent.starts_with("POST /init HTTP/1.1\r\n"), "{sent}");
        assert!(sent.ends_with("\r\n\r\n{\"accessToken\":\"t\"}"), "{sent}");
    }

    #[tokio::test]
    async fn refusals_and_missing_sockets_map_to_reply_kinds() {
        let (dir, _server) =
            serve_once("HTTP/1.1 400 Bad Request\r\ncontent-length: 4\r\n\r\nnope").await;
        let error = post_init(&dir.path().join("s"), &InitRequest::default())
            .await
            .unwrap_err();
        let reply = error.reply("envd");
        assert_eq!(reply.kind, ErrorKind::BadRequest);
        assert!(
            reply.message.contains("HTTP 400: nope"),
            "{}",
            reply.message
        );

        let missing = post_init(&dir.path().join("missing"), &InitRequest::default())
            .await
            .unwrap_err();
        assert_eq!(missing.reply("envd").kind, ErrorKind::NotFound);
    }
}
