//! Client of the VMM process's control API (`roost vm run --api-socket PATH`, served by
//! `roost_vmm::api`): one Unix stream connection per request, one JSON object per line each
//! way. Pause, resume, snapshot and stop a running VM without signals.
//!
//! The wire types are `roost_proto::vmm_api`, shared with the server; the worker talks to the
//! VMM as a separate process and does not link the KVM crates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_proto::vmm_api::{MAX_LINE, Reply};
pub use roost_proto::vmm_api::{Request as ApiRequest, RunState, SnapshotInfo, SnapshotKind};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest reply line accepted (the server's own request limit).
const MAX_REPLY: u64 = MAX_LINE as u64;

/// What a successful request answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiReply {
    pub state: Option<RunState>,
    pub snapshot: Option<SnapshotInfo>,
}

/// A request to the VMM's API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the VMM's API socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the VMM's API failed")]
    Io(#[from] std::io::Error),
    #[error("the VMM's API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the VMM's API answered something unreadable: {0}")]
    BadReply(String),
    #[error("the VMM refused: {0}")]
    Refused(String),
}

/// Sends `request` to the API on `socket` and waits up to `timeout` for its reply.
pub async fn call(
    socket: &Path,
    request: &ApiRequest,
    timeout: Duration,
) -> Result<ApiReply, ApiError> {
    match tokio::time::timeout(timeout, exchange(socket, request)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Timeout(timeout)),
    }
}

async fn exchange(socket: &Path, request: &ApiRequest) -> Result<ApiReply, ApiError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ApiError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    // Serialising our own enum of paths and flags cannot fail.
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut reply = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(stream, MAX_REPLY));
    reader.read_line(&mut reply).await?;
    if !reply.ends_with('\n') {
        return Err(ApiError::BadReply(if reply.is_empty() {
            "the connection closed without a reply".into()
        } else {
            format!("an unterminated or over-long line: {:?}", truncate(&reply))
        }));
    }
    let reply: Reply = serde_json::from_str(&reply)
        .map_err(|e| ApiError::BadReply(format!("{e}: {:?}", truncate(&reply))))?;
    if reply.ok {
        Ok(ApiReply {
            state: reply.state,
            snapshot: reply.snapshot,
        })
    } else {
        Err(ApiError::Refused(
            reply.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}

fn truncate(text: &str) -> &str {
    let end = text
        .char_indices()
        .nth(200)
        .map_or(text.len(), |(index, _)| index);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_vmm_s_json() {
        let json = |r: &ApiRequest| serde_json::to_string(r).unwrap();
        assert_eq!(json(&ApiRequest::Pause), r#"{"op":"pause"}"#);
        assert_eq!(json(&ApiRequest::Resume), r#"{"op":"resume"}"#);
        assert_eq!(json(&ApiRequest::Stop), r#"{"op":"stop"}"#);
        assert_eq!(json(&ApiRequest::Status), r#"{"op":"status"}"#);
        let snapshot = ApiRequest::Snapshot {
            dir: "/s/1".into(),
            kind: SnapshotKind::Diff,
            parent: Some("/s/0".into()),
            resume: true,
        };
        assert_eq!(
            json(&snapshot),
            r#"{"op":"snapshot","dir":"/s/1","kind":"diff","parent":"/s/0","resume":true}"#
        );
    }

    /// A one-request API server answering `reply`; returns the request line it got.
    async fn serve_once(
        reply: &'static str,
    ) -> (tempfile::TempDir, tokio::task::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::UnixListener::bind(dir.path().join("api.sock")).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            BufReader::new(read).read_line(&mut line).await.unwrap();
            write.write_all(reply.as_bytes()).await.unwrap();
            line
        });
        (dir, server)
    }

    #[tokio::test]
    async fn a_snapshot_reply_is_parsed() {
        let (dir, server) = serve_once(
            "{\"ok\":true,\"state\":\"paused\",\"snapshot\":{\"dir\":\"/s\",\"kind\":\"full\",\
             \"memory_pages_written\":7,\"memory_depth\":1,\"paused_ms\":12,\"state_bytes\":99}}\n",
        )
        .await;
        let request = ApiRequest::Snapshot {
            dir: "/s".into(),
            kind: SnapshotKind::Full,
            parent: None,
            resume: false,
        };
        let reply = call(
            &dir.path().join("api.sock"),
            &request,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(reply.state, Some(RunState::Paused));
        let info = reply.snapshot.unwrap();
        assert_eq!((info.memory_pages_written, info.paused_ms), (7, 12));
        assert_eq!(
            server.await.unwrap(),
            "{\"op\":\"snapshot\",\"dir\":\"/s\",\"kind\":\"full\",\"resume\":false}\n"
        );
    }

    #[tokio::test]
    async fn refusals_garbage_silence_and_absence_are_errors() {
        let (dir, _server) = serve_once("{\"ok\":false,\"error\":\"diff needs a parent\"}\n").await;
        let socket = dir.path().join("api.sock");
        let error = call(&socket, &ApiRequest::Pause, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ApiError::Refused(m) if m == "diff needs a parent"),
            "{error}"
        );

        let (dir, _server) = serve_once("not json\n").await;
        let error = call(
            &dir.path().join("api.sock"),
            &ApiRequest::Pause,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, ApiError::BadReply(_)), "{error}");

        let (dir, _server) = serve_once("").await;
        let error = call(
            &dir.path().join("api.sock"),
            &ApiRequest::Pause,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(error.to_string().contains("without a reply"), "{error}");

        let dir = tempfile::tempdir().unwrap();
        let _silent = tokio::net::UnixListener::bind(dir.path().join("api.sock")).unwrap();
        let error = call(
            &dir.path().join("api.sock"),
            &ApiRequest::Pause,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, ApiError::Timeout(_)), "{error}");

        let error = call(
            &dir.path().join("missing"),
            &ApiRequest::Pause,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, ApiError::Connect { .. }), "{error}");
    }
}
