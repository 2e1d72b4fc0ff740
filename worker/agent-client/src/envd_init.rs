//! `POST /init` to the envd API in the guest: the worker hands a sandbox its id, environment,
//! access token, default user and workdir, and the host's clock.
//!
//! envd serves `/init` only on a private Unix socket in the guest; the request travels over a
//! forward to that socket ([`AgentClient::forward_envd_init`]). It is one small HTTP/1.1
//! exchange (`Connection: close`, a JSON body, a bodyless or short answer), written by hand
//! with the response head parsed by `httparse`, rather than pulling a full HTTP client (hyper +
//! hyper-util) into the worker for a single request.

use std::time::Duration;

use roost_proto::agent::InitRequest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{AgentClient, Error};

/// How long envd may take to answer `/init`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (envd's is a status line, a few headers and at most a short message).
const MAX_RESPONSE_LEN: usize = 64 * 1024;
/// Response headers parsed at most.
const MAX_HEADERS: usize = 32;

impl AgentClient {
    /// Sends `request` to envd's `POST /init` in the guest and checks that envd accepted it
    /// (2xx). A refusal is [`Error::InitRejected`] with envd's status and message.
    pub async fn init_sandbox(&self, request: &InitRequest) -> Result<(), Error> {
        let mut stream = self.forward_envd_init().await?;
        post_init(&mut stream, request).await
    }
}

/// The HTTP exchange over an open stream to envd's init socket.
async fn post_init<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &InitRequest,
) -> Result<(), Error> {
    let body = serde_json::to_vec(request)
        .map_err(|e| Error::InitResponse(format!("cannot encode the request: {e}")))?;
    let head = format!(
        "POST /init HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    let response = tokio::time::timeout(RESPONSE_TIMEOUT, read_response(stream))
        .await
        .map_err(|_| {
            Error::InitResponse(format!("no answer within {} s", RESPONSE_TIMEOUT.as_secs()))
        })??;
    check_response(&response)
}

/// Reads until envd closes (it was asked to), bounded by [`MAX_RESPONSE_LEN`].
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, Error> {
    let mut response = Vec::new();
    let mut limited = stream.take(u64::try_from(MAX_RESPONSE_LEN).unwrap_or(u64::MAX) + 1);
    limited.read_to_end(&mut response).await?;
    if response.len() > MAX_RESPONSE_LEN {
        return Err(Error::InitResponse(format!(
            "longer than {MAX_RESPONSE_LEN} bytes"
        )));
    }
    Ok(response)
}

/// Success for a 2xx status; otherwise the status and envd's message.
fn check_response(response: &[u8]) -> Result<(), Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let body_start = match parsed.parse(response) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if response.is_empty() => {
            return Err(Error::InitResponse("envd closed without answering".into()));
        }
        Ok(httparse::Status::Partial) => {
            return Err(Error::InitResponse("truncated response head".into()));
        }
        Err(e) => return Err(Error::InitResponse(e.to_string())),
    };
    let status = parsed
        .code
        .ok_or_else(|| Error::InitResponse("no status code".into()))?;
    if (200..300).contains(&status) {
        return Ok(());
    }
    let body = String::from_utf8_lossy(&response[body_start..]);
    Err(Error::InitRejected {
        status,
        body: body.trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sends_a_json_post_and_accepts_204() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let envd = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            // The request is small: read until the body's closing brace has arrived.
            while !got.ends_with(b"}") {
                let n = server.read(&mut buf).await.unwrap();
                assert!(
                    n > 0,
                    "client closed early: {}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&buf[..n]);
            }
            server
                .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            drop(server);
            String::from_utf8(got).unwrap()
        });
        let request = InitRequest {
            access_token: Some("t".into()),
            ..InitRequest::default()
        };
        post_init(&mut client, &request).await.unwrap();
        let sent = envd.await.unwrap();
        assert!(sent.starts_with("POST /init HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("Content-Length: 19\r\n"), "{sent}");
        assert!(sent.ends_with("\r\n\r\n{\"accessToken\":\"t\"}"), "{sent}");
    }

    #[test]
    fn refusals_and_garbage_are_errors() {
        let refused =
            check_response(b"HTTP/1.1 400 Bad Request\r\n\r\ndefaultUser must not be empty");
        assert!(
            matches!(&refused, Err(Error::InitRejected { status: 400, body }) if body == "defaultUser must not be empty"),
            "{refused:?}"
        );
        for garbage in [&b""[..], b"HTTP/1.1 204", b"SSH-2.0-x\r\n\r\n"] {
            assert!(
                matches!(check_response(garbage), Err(Error::InitResponse(_))),
                "{garbage:?}"
            );
        }
        assert!(check_response(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_ok());
    }
}
