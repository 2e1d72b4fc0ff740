//! Route discovery: which worker hosts a sandbox, its state and its access settings.
//!
//! Kept apart from the proxy (as pingora-load-balancing keeps discovery apart from selection):
//! [`ControlApi`] is how routes are fetched from control, [`cache::RouteCache`] holds them,
//! [`sync::RouteSync`] is the background service that drops entries when control announces a
//! change, and [`resolver::Resolver`] is the one call the proxy makes (cache, fetch, auto-resume).

pub mod cache;
pub mod control;
pub mod redis_events;
pub mod resolver;
pub mod sync;

use std::time::Duration;

use async_trait::async_trait;
use roost_proto::ids::SandboxId;
use serde::Deserialize;

/// A sandbox's lifecycle state as control reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteState {
    Running,
    Paused,
    /// Being created: routable shortly.
    Creating,
    /// Lost with its worker, or any state this gateway does not know: not routable.
    #[serde(other)]
    Other,
}

/// What the gateway needs to proxy to a sandbox (`GET /internal/v1/routes/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Route {
    pub sandbox_id: String,
    pub team_id: String,
    pub state: RouteState,
    #[serde(default)]
    pub worker_id: Option<String>,
    /// Hex SHA-256 of the envd access token; `None` when the sandbox has no token.
    #[serde(default)]
    pub envd_access_token_sha256: Option<String>,
    /// Ports other than envd's are open to anyone when true.
    #[serde(default = "default_public")]
    pub public: bool,
    /// Hex SHA-256 of the traffic access token required when `public` is false.
    #[serde(default)]
    pub traffic_access_token_sha256: Option<String>,
}

fn default_public() -> bool {
    true
}

/// One line of control's route event stream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RouteEvent {
    /// Absent for [`RouteEventKind::Resync`].
    #[serde(default)]
    pub sandbox_id: Option<String>,
    pub kind: RouteEventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteEventKind {
    Changed,
    Removed,
    /// Drop every cached route (first event of every stream, and after control's buffer
    /// overflowed).
    Resync,
}

/// Result of asking control to resume a paused sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// Running now.
    Resumed,
    /// Unknown sandbox (404).
    NotFound,
    /// Control refused (409: e.g. being killed) or could not (503: no capacity).
    Refused(u16),
}

/// Failures talking to control.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control at {url} is unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("control answered {status} for {url}")]
    Status { url: String, status: u16 },
    #[error("control's reply from {url} is not a valid route")]
    BadBody {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("control did not answer {url} within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// Control's internal route API, as the gateway uses it. The real one is
/// [`control::HttpControl`]; tests substitute their own.
#[async_trait]
pub trait ControlApi: Send + Sync + 'static {
    /// The route of `sandbox`, `None` when control does not know it.
    async fn route(&self, sandbox: &SandboxId) -> Result<Option<Route>, ControlError>;
    /// Resumes a paused sandbox and waits (at most `timeout`) until it runs.
    async fn resume(
        &self,
        sandbox: &SandboxId,
        timeout: Duration,
    ) -> Result<ResumeOutcome, ControlError>;
    /// Opens the event stream; each item is one change. Ends when the connection drops.
    async fn events(&self) -> Result<EventStream, ControlError>;
}

/// A stream of route events (a channel fed by the connection's reader task).
pub type EventStream = tokio::sync::mpsc::Receiver<RouteEvent>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_json_from_control() {
        let route: Route = serde_json::from_str(
            r#"{"sandbox_id":"cl-a","team_id":"t1","state":"running","worker_id":"w-1",
                "envd_access_token_sha256":"ab","public":false,"traffic_access_token_sha256":null}"#,
        )
        .unwrap();
        assert_eq!(route.state, RouteState::Running);
        assert_eq!(route.worker_id.as_deref(), Some("w-1"));
        assert!(!route.public);
        let minimal: Route =
            serde_json::from_str(r#"{"sandbox_id":"cl-a","team_id":"t","state":"pausing"}"#)
                .unwrap();
        assert_eq!(minimal.state, RouteState::Other);
        let creating: Route =
            serde_json::from_str(r#"{"sandbox_id":"cl-a","team_id":"t","state":"creating"}"#)
                .unwrap();
        assert_eq!(creating.state, RouteState::Creating);
        assert!(minimal.public);
    }

    #[test]
    fn event_json() {
        let ev: RouteEvent =
            serde_json::from_str(r#"{"sandbox_id":"cl-a","kind":"removed"}"#).unwrap();
        assert_eq!(ev.kind, RouteEventKind::Removed);
        let ev: RouteEvent = serde_json::from_str(r#"{"kind":"resync"}"#).unwrap();
        assert_eq!((ev.kind, ev.sandbox_id), (RouteEventKind::Resync, None));
    }
}
