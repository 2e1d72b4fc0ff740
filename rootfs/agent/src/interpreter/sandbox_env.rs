//! The sandbox's own environment variables (`Sandbox.create(envs=...)`), read from envd.
//!
//! envd holds them (`GET /envs` on :49983, set by the worker's `/init`); E2B's interpreter
//! reads them there once per kernel, with the caller's `X-Access-Token`, and sets them in the
//! kernel's `os.environ` before its first cell. So do we (and ask again before the next cell
//! while envd cannot be reached). The request is a single HTTP/1.0 GET
//! to a daemon on the same machine, written here rather than pulling in an HTTP client stack
//! for it; any failure (no envd, as in tests, or an error reply) means "no variables".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long envd may take to answer.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Largest reply read.
const MAX_REPLY: u64 = 1 << 20;

/// Reads envd's variables from `envd`: `None` when envd could not be asked or refused (try
/// again later), an empty map when it is not configured.
pub async fn fetch(
    envd: Option<SocketAddr>,
    access_token: Option<&str>,
) -> Option<BTreeMap<String, String>> {
    let Some(envd) = envd else {
        return Some(BTreeMap::new());
    };
    match tokio::time::timeout(TIMEOUT, get_envs(envd, access_token)).await {
        Ok(Ok(vars)) => Some(vars),
        Ok(Err(e)) => {
            tracing::debug!(%envd, "no sandbox env vars from envd: {e}");
            None
        }
        Err(_) => {
            tracing::warn!(%envd, "envd did not answer GET /envs within {TIMEOUT:?}");
            None
        }
    }
}

async fn get_envs(
    envd: SocketAddr,
    access_token: Option<&str>,
) -> Result<BTreeMap<String, String>, String> {
    let mut stream = tokio::net::TcpStream::connect(envd)
        .await
        .map_err(|e| e.to_string())?;
    let token = access_token
        .filter(|t| !t.contains(['\r', '\n']))
        .map(|t| format!("X-Access-Token: {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET /envs HTTP/1.0\r\nHost: {envd}\r\n{token}\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    stream
        .take(MAX_REPLY)
        .read_to_end(&mut reply)
        .await
        .map_err(|e| e.to_string())?;
    parse_reply(&reply)
}

/// Parses an HTTP/1.x reply whose body is a JSON object of strings.
fn parse_reply(reply: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("reply without a header end")?;
    let status_line = reply[..split]
        .split(|b| *b == b'\n')
        .next()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        return Err(format!("envd answered {}", status_line.trim()));
    }
    serde_json::from_slice(&reply[split + 4..]).map_err(|e| format!("bad /envs body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_200_with_a_json_object_gives_the_variables() {
        let reply =
            b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"A\":\"1\",\"B\":\"x y\"}";
        let vars = parse_reply(reply).unwrap();
        assert_eq!(vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(vars.get("B").map(String::as_str), Some("x y"));
    }

    #[test]
    fn errors_and_garbage_are_refused() {
        assert!(parse_reply(b"HTTP/1.1 401 Unauthorized\r\n\r\n{}").is_err());
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\n\r\n[1]").is_err());
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\n\r\n{\"A\": 1}").is_err());
        assert!(parse_reply(b"garbage").is_err());
    }

    #[tokio::test]
    async fn nothing_listening_means_ask_again_and_no_envd_means_none() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert_eq!(fetch(Some(addr), Some("t")).await, None);
        assert_eq!(fetch(None, None).await, Some(BTreeMap::new()));
    }
}
