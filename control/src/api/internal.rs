//! The internal API the gateway uses: sandbox routes, a stream of route changes, and
//! auto-resume. Not team-scoped — the gateway is trusted infrastructure — so every route
//! requires the shared internal token (`Authorization: Bearer`), of which control keeps only
//! the SHA-256 ([`InternalToken`]).
//!
//! Route changes come from the store's change feed (`store::changes`), which every sandbox
//! state change passes through. The event stream starts with a `resync` event (the gateway
//! drops its cache: it may have missed changes while disconnected) and repeats it if this
//! subscriber fell behind the feed's buffer.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Path, optional_json};
use super::v1::sandboxes::{DEFAULT_TIMEOUT_SECS, check_id};
use crate::lifecycle::{Connected, SandboxState};
use crate::store::audit::Actor;
use crate::store::changes::SandboxChange;
use crate::store::sandboxes::{self, Sandbox};

/// How often an idle event stream carries a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The SHA-256 of the gateway ↔ control token; the token itself is never kept.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InternalToken([u8; 32]);

impl std::fmt::Debug for InternalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InternalToken(sha256:..)")
    }
}

/// Why an internal token setting is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the internal token must be at least 32 characters")]
    TooShort,
    #[error("the internal token hash must be 64 hex characters (a SHA-256)")]
    BadHash,
}

/// Shortest accepted internal token.
pub const MIN_TOKEN_LEN: usize = 32;

impl InternalToken {
    /// From the token itself (hashed at once).
    pub fn from_secret(secret: &str) -> Result<Self, TokenError> {
        let secret = secret.trim();
        if secret.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort);
        }
        Ok(Self(Sha256::digest(secret.as_bytes()).into()))
    }

    /// From its SHA-256 in hex, so the secret need not be on control's host at all.
    pub fn from_sha256_hex(hex_digest: &str) -> Result<Self, TokenError> {
        let bytes = hex::decode(hex_digest.trim()).map_err(|_| TokenError::BadHash)?;
        let digest: [u8; 32] = bytes.try_into().map_err(|_| TokenError::BadHash)?;
        Ok(Self(digest))
    }

    /// Whether `presented` is the token (constant time in the digest comparison).
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(digest.ct_eq(&self.0))
    }
}

/// A request that carried the internal token.
#[derive(Debug, Clone, Copy)]
pub struct Internal;

impl FromRequestParts<AppState> for Internal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = state.config.internal_token else {
            return Err(ApiError::forbidden(
                "the internal API is disabled: start control with --internal-token",
            ));
        };
        let presented = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(token) if expected.matches(token) => Ok(Internal),
            _ => Err(ApiError::unauthorized("invalid internal token")),
        }
    }
}

/// Where a sandbox runs and what it takes to reach it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Route {
    pub sandbox_id: String,
    pub team_id: String,
    /// `creating`, `running`, `paused` or `lost` (killed sandboxes are 404).
    pub state: SandboxState,
    /// The host (worker id) holding it; route only when `running` and set.
    pub worker_id: Option<String>,
    /// SHA-256 (lowercase hex) of the envd access token; `null`: envd needs no token.
    pub envd_access_token_sha256: Option<String>,
    /// Ports other than envd's are open to anyone.
    pub public: bool,
    /// SHA-256 (lowercase hex) of the traffic access token when `public` is false.
    pub traffic_access_token_sha256: Option<String>,
}

fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn route_of(s: Sandbox) -> Route {
    Route {
        envd_access_token_sha256: s.envd_access_token.as_deref().map(sha256_hex),
        traffic_access_token_sha256: s.traffic_access_token.as_deref().map(sha256_hex),
        public: s.allow_public_traffic,
        sandbox_id: s.id,
        team_id: s.team_id,
        state: s.state,
        worker_id: s.host_id,
    }
}

async fn live(state: &AppState, id: &str) -> Result<Sandbox, ApiError> {
    check_id(id)?;
    match sandboxes::get_any_team(state.db(), id).await? {
        Some(s) if s.state != SandboxState::Killed => Ok(s),
        _ => Err(ApiError::not_found("sandbox not found")),
    }
}

/// The route of one sandbox.
#[utoipa::path(get, path = "/internal/v1/routes/{sandbox_id}", tag = "internal", security(("bearer" = [])),
    params(("sandbox_id" = String, Path)),
    responses((status = 200, body = Route), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_route(
    State(state): State<AppState>,
    _: Internal,
    Path(id): Path<String>,
) -> Result<axum::Json<Route>, ApiError> {
    Ok(axum::Json(route_of(live(&state, &id).await?)))
}

/// One event of the route stream.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum RouteEvent {
    Change(SandboxChange),
    /// `{"kind":"resync"}`: drop every cached route.
    Resync {
        kind: &'static str,
    },
}

const RESYNC: RouteEvent = RouteEvent::Resync { kind: "resync" };

fn sse(event: &RouteEvent) -> Event {
    Event::default().data(serde_json::to_string(event).unwrap_or_default())
}

/// Route changes as server-sent events: first `{"kind":"resync"}`, then
/// `{"sandbox_id","kind":"changed"|"removed"}` per change.
#[utoipa::path(get, path = "/internal/v1/routes/events", tag = "internal", security(("bearer" = [])),
    responses((status = 200, description = "text/event-stream of RouteEvent JSON objects", body = RouteEvent, content_type = "text/event-stream"),
        (status = 401, body = ErrorBody)))]
pub async fn route_events(
    State(state): State<AppState>,
    _: Internal,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.db().subscribe_changes();
    let stream =
        futures_util::stream::unfold((receiver, true), |(mut receiver, first)| async move {
            if first {
                return Some((Ok(sse(&RESYNC)), (receiver, false)));
            }
            match receiver.recv().await {
                Ok(change) => Some((Ok(sse(&RouteEvent::Change(change))), (receiver, false))),
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "route event subscriber fell behind; resync");
                    Some((Ok(sse(&RESYNC)), (receiver, false)))
                }
                Err(RecvError::Closed) => None,
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// Body of the resume call.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeBody {
    /// Seconds the resumed sandbox may run (default 300).
    pub timeout_secs: Option<u64>,
}

/// Resumes a paused sandbox for the gateway (auto-resume); answers once it runs.
#[utoipa::path(post, path = "/internal/v1/sandboxes/{sandbox_id}/resume", tag = "internal", security(("bearer" = [])),
    params(("sandbox_id" = String, Path)), request_body = ResumeBody,
    responses((status = 200, body = Route), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    _: Internal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Route>, ApiError> {
    let body: ResumeBody = optional_json(&body)?;
    let sandbox = live(&state, &id).await?;
    let timeout = body.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    let resumed = state
        .sandboxes
        .connect(&Actor::System, &sandbox.team_id, &id, timeout)
        .await?;
    let sandbox = match resumed {
        Connected::AlreadyRunning(s) | Connected::Resumed(s) => s,
    };
    Ok(axum::Json(route_of(sandbox)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::changes::ChangeKind;

    #[test]
    fn tokens_are_kept_hashed_and_compared() {
        let secret = "0123456789abcdef0123456789abcdef";
        let token = InternalToken::from_secret(secret).unwrap();
        assert!(token.matches(secret));
        assert!(!token.matches("0123456789abcdef0123456789abcdeX"));
        let from_hash = InternalToken::from_sha256_hex(&sha256_hex(secret)).unwrap();
        assert_eq!(from_hash, token);
        assert_eq!(
            InternalToken::from_secret("short"),
            Err(TokenError::TooShort)
        );
        assert_eq!(
            InternalToken::from_sha256_hex("abcd"),
            Err(TokenError::BadHash)
        );
        assert!(!format!("{token:?}").contains(&sha256_hex(secret)));
    }

    #[test]
    fn events_serialise_as_posted() {
        let change = RouteEvent::Change(SandboxChange {
            sandbox_id: "cl-1".into(),
            kind: ChangeKind::Removed,
        });
        assert_eq!(
            serde_json::to_value(&change).unwrap(),
            serde_json::json!({"sandbox_id": "cl-1", "kind": "removed"})
        );
        assert_eq!(
            serde_json::to_value(&RESYNC).unwrap(),
            serde_json::json!({"kind": "resync"})
        );
    }
}
