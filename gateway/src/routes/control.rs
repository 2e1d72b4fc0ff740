//! [`ControlApi`] over control's internal HTTP API (`/internal/v1/...`, bearer token).
//!
//! The event stream may be server-sent events or NDJSON: both are one JSON object per line
//! (SSE prefixes it with `data:`), so one line reader handles both.

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use roost_proto::ids::SandboxId;
use tokio::sync::mpsc;

use super::{ControlApi, ControlError, EventStream, ResumeOutcome, Route, RouteEvent};

/// Longest event line accepted; a longer one is a broken stream.
const MAX_EVENT_LINE: usize = 64 * 1024;

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// Control's internal API at `base` (e.g. `http://127.0.0.1:3000`).
#[derive(Debug, Clone)]
pub struct HttpControl {
    base: String,
    token: String,
    client: Client<HttpConnector, Body>,
    request_timeout: Duration,
}

impl HttpControl {
    /// `base` must be an `http://host:port` URL; `token` is the shared internal token.
    pub fn new(
        base: &str,
        token: &str,
        request_timeout: Duration,
    ) -> Result<Self, InvalidControlUrl> {
        let uri: Uri = base
            .parse()
            .map_err(|_| InvalidControlUrl(base.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(InvalidControlUrl(base.to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            request_timeout,
        })
    }

    fn request(&self, method: Method, path: &str, body: Body) -> (String, Request<Body>) {
        let url = format!("{}{}", self.base, path);
        let request = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(
                header::ACCEPT,
                "application/json, text/event-stream, application/x-ndjson",
            )
            .body(body)
            .expect("request parts are valid: the URL was checked in new()");
        (url, request)
    }

    async fn send(
        &self,
        url: &str,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, ControlError> {
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err(ControlError::Timeout {
                url: url.to_owned(),
                timeout,
            }),
            Ok(Err(e)) => Err(ControlError::Unreachable {
                url: url.to_owned(),
                source: Box::new(e),
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

/// The control URL is not `http://host[:port]`.
#[derive(Debug, thiserror::Error)]
#[error("control URL {0:?} must look like http://host:port")]
pub struct InvalidControlUrl(pub String);

#[async_trait]
impl ControlApi for HttpControl {
    async fn route(&self, sandbox: &SandboxId) -> Result<Option<Route>, ControlError> {
        let (url, request) = self.request(
            Method::GET,
            &format!("/internal/v1/routes/{sandbox}"),
            Empty::new().boxed(),
        );
        let response = self.send(&url, request, self.request_timeout).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            status => {
                return Err(ControlError::Status {
                    url,
                    status: status.as_u16(),
                });
            }
        }
        let body = tokio::time::timeout(self.request_timeout, response.into_body().collect())
            .await
            .map_err(|_| ControlError::Timeout {
                url: url.clone(),
                timeout: self.request_timeout,
            })?
            .map_err(|e| ControlError::Unreachable {
                url: url.clone(),
                source: Box::new(e),
            })?
            .to_bytes();
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|source| ControlError::BadBody { url, source })
    }

    async fn resume(
        &self,
        sandbox: &SandboxId,
        timeout: Duration,
    ) -> Result<ResumeOutcome, ControlError> {
        let (url, mut request) = self.request(
            Method::POST,
            &format!("/internal/v1/sandboxes/{sandbox}/resume"),
            Full::new(Bytes::from(
                serde_json::json!({ "timeout_secs": timeout.as_secs().max(1) }).to_string(),
            ))
            .boxed(),
        );
        request.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let response = self.send(&url, request, timeout).await?;
        let status = response.status();
        Ok(match status.as_u16() {
            200..=299 => ResumeOutcome::Resumed,
            404 => ResumeOutcome::NotFound,
            409 | 503 => ResumeOutcome::Refused(status.as_u16()),
            other => return Err(ControlError::Status { url, status: other }),
        })
    }

    async fn events(&self) -> Result<EventStream, ControlError> {
        let (url, request) = self.request(
            Method::GET,
            "/internal/v1/routes/events",
            Empty::new().boxed(),
        );
        let response = self.send(&url, request, self.request_timeout).await?;
        if response.status() != StatusCode::OK {
            return Err(ControlError::Status {
                url,
                status: response.status().as_u16(),
            });
        }
        let (tx, rx) = mpsc::channel(256);
        let mut body = response.into_body();
        tokio::spawn(async move {
            let mut lines = LineSplitter::default();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let Ok(events) = lines.push(&data) else {
                    tracing::warn!(
                        url,
                        "route event line longer than {MAX_EVENT_LINE} bytes; reconnecting"
                    );
                    break;
                };
                for event in events {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Splits a byte stream into lines and parses the event lines among them.
#[derive(Debug, Default)]
struct LineSplitter {
    buf: BytesMut,
}

#[derive(Debug)]
struct LineTooLong;

impl LineSplitter {
    fn push(&mut self, data: &[u8]) -> Result<Vec<RouteEvent>, LineTooLong> {
        self.buf.extend_from_slice(data);
        let mut events = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line = self.buf.split_to(end);
            self.buf.advance(1);
            if let Some(event) = parse_event_line(&line) {
                events.push(event);
            }
        }
        if self.buf.len() > MAX_EVENT_LINE {
            return Err(LineTooLong);
        }
        Ok(events)
    }
}

/// One NDJSON line or SSE `data:` line; comments, other SSE fields and blank lines give None.
fn parse_event_line(line: &[u8]) -> Option<RouteEvent> {
    let line = std::str::from_utf8(line).ok()?.trim();
    let json = line.strip_prefix("data:").map(str::trim).unwrap_or(line);
    if !json.starts_with('{') {
        return None;
    }
    match serde_json::from_str(json) {
        Ok(event) => Some(event),
        Err(error) => {
            tracing::warn!(%error, "ignoring a route event control sent that is not valid");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::RouteEventKind;

    #[test]
    fn ndjson_and_sse_lines() {
        let mut s = LineSplitter::default();
        let evs = s
            .push(b"{\"sandbox_id\":\"cl-a\",\"kind\":\"changed\"}\n: keepalive\n\nevent: route\ndata: {\"sandbox_id\":\"cl-b\",")
            .unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].sandbox_id.as_deref(), Some("cl-a"));
        let evs = s.push(b"\"kind\":\"removed\"}\r\n\r\n").unwrap();
        assert_eq!(
            evs,
            vec![RouteEvent {
                sandbox_id: Some("cl-b".into()),
                kind: RouteEventKind::Removed
            }]
        );
    }

    #[test]
    fn bad_lines_are_skipped_and_huge_ones_refused() {
        let mut s = LineSplitter::default();
        assert!(
            s.push(b"{not json}\n{\"sandbox_id\":1}\n")
                .unwrap()
                .is_empty()
        );
        assert!(s.push(&vec![b'x'; MAX_EVENT_LINE + 1]).is_err());
    }

    #[test]
    fn only_http_urls() {
        let t = Duration::from_secs(1);
        assert!(HttpControl::new("http://127.0.0.1:3000", "t", t).is_ok());
        assert!(HttpControl::new("https://control:3000", "t", t).is_err());
        assert!(HttpControl::new("127.0.0.1:3000", "t", t).is_err());
    }
}
