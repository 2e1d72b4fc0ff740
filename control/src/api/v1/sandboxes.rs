//! Native sandbox routes. Requests are strict (unknown fields are refused); responses show
//! the full stored state, including killed sandboxes, which the E2B routes hide.

use std::collections::BTreeMap;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::caller::TeamScope;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{Json, Path, query_pairs};
use crate::api::time::rfc3339;
use crate::api::{filters, pagination};
use crate::lifecycle::{Connected, CreateRequest, SandboxState};
use crate::store::sandboxes::{self, After, ListQuery, Sandbox};

pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewSandbox {
    /// Template id or alias.
    pub template: String,
    /// Seconds until the sandbox is killed (or paused, with `autoPause`); default 300.
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Passed to the guest; only the names are stored.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default)]
    pub auto_pause: bool,
    pub allow_internet: Option<bool>,
    /// Require an access token for the guest daemon (default true).
    pub secure: Option<bool>,
    /// Ports other than the guest daemon's are open to anyone (default true); when false they
    /// need the `e2b-traffic-access-token` header with `trafficAccessToken`.
    pub allow_public_traffic: Option<bool>,
    /// Destinations reachable whatever `denyOut` and `allowInternet` say: IPv4 addresses,
    /// CIDRs, host names, or `*.domain` for its subdomains (at most 1000; E2B's
    /// `network.allowOut`).
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// Destinations refused unless `allowOut` names them (same syntax; E2B's `network.denyOut`).
    #[serde(default)]
    pub deny_out: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeoutBody {
    pub timeout_secs: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxView {
    pub id: String,
    pub template_id: String,
    pub state: SandboxState,
    pub metadata: BTreeMap<String, String>,
    pub env_var_names: Vec<String>,
    pub host_id: Option<String>,
    pub cpu_count: i64,
    pub memory_mb: i64,
    pub disk_size_mb: i64,
    pub envd_version: String,
    pub envd_access_token: Option<String>,
    pub auto_pause: bool,
    pub allow_internet: bool,
    pub created_at: String,
    pub started_at: String,
    pub end_at: String,
    pub ended_at: Option<String>,
    pub allow_public_traffic: bool,
    pub traffic_access_token: Option<String>,
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPage {
    pub sandboxes: Vec<SandboxView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Metric {
    pub timestamp: String,
    pub cpu_count: i64,
    pub cpu_used_pct: f64,
    pub mem_used: i64,
    pub mem_total: i64,
    pub disk_used: i64,
    pub disk_total: i64,
}

pub fn view(s: Sandbox) -> SandboxView {
    SandboxView {
        id: s.id,
        template_id: s.template_id,
        state: s.state,
        metadata: s.metadata,
        env_var_names: s.env_var_names,
        host_id: s.host_id,
        cpu_count: s.cpu_count,
        memory_mb: s.memory_mb,
        disk_size_mb: s.disk_size_mb,
        envd_version: s.envd_version,
        envd_access_token: s.envd_access_token,
        auto_pause: s.auto_pause,
        allow_internet: s.allow_internet,
        created_at: rfc3339(s.created_at),
        started_at: rfc3339(s.started_at),
        end_at: rfc3339(s.end_at),
        ended_at: s.ended_at.map(rfc3339),
        allow_public_traffic: s.allow_public_traffic,
        traffic_access_token: s.traffic_access_token,
        allow_out: s.allow_out,
        deny_out: s.deny_out,
    }
}

/// The `Idempotency-Key` header, if any.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request("Idempotency-Key is not valid text"))
        })
        .transpose()
}

/// A path id that is not a sandbox id is refused before any lookup.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    id.parse::<roost_proto::SandboxId>()
        .map(|_| ())
        .map_err(|e| ApiError::bad_request(format!("invalid sandbox id: {e}")))
}

/// Creates a sandbox from a template. Honours `Idempotency-Key`.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", security(("api_key" = []), ("bearer" = [])),
    request_body = NewSandbox, params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, body = SandboxView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    scope: TeamScope,
    headers: HeaderMap,
    Json(req): Json<NewSandbox>,
) -> Result<(StatusCode, axum::Json<SandboxView>), ApiError> {
    let request = CreateRequest {
        template: req.template,
        timeout_secs: req.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS),
        metadata: req.metadata,
        env_vars: req.env_vars,
        auto_pause: req.auto_pause,
        allow_internet: req.allow_internet.unwrap_or(true),
        secure: req.secure.unwrap_or(true),
        allow_public_traffic: req.allow_public_traffic.unwrap_or(true),
        allow_out: req.allow_out,
        deny_out: req.deny_out,
    };
    let sandbox = state
        .sandboxes
        .create(
            &scope.actor(),
            &scope.team_id,
            &request,
            idempotency_key(&headers)?,
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(view(sandbox))))
}

/// The team's sandboxes, newest first. Filters: `state` (repeatable, default all but killed),
/// `metadata` (URL-encoded `k=v&...`, all must match); pagination: `limit`, `cursor`.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", security(("api_key" = []), ("bearer" = [])),
    params(("state" = Option<String>, Query), ("metadata" = Option<String>, Query), ("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = SandboxPage), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    scope: TeamScope,
    RawQuery(raw): RawQuery,
) -> Result<axum::Json<SandboxPage>, ApiError> {
    let mut q = ListQuery {
        limit: pagination::DEFAULT_LIMIT,
        ..ListQuery::default()
    };
    for (k, v) in query_pairs(raw.as_deref())? {
        match k.as_str() {
            "state" => filters::states(&v, &SandboxState::ALL, &mut q.states)?,
            "metadata" => q.metadata.extend(filters::metadata(&v)?),
            "limit" => q.limit = pagination::limit(Some(&v))?,
            "cursor" => q.after = Some(pagination::decode_sandbox(&v)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    if q.states.is_empty() {
        q.states = SandboxState::ALL
            .into_iter()
            .filter(|s| *s != SandboxState::Killed)
            .collect();
    }
    let (rows, more) = sandboxes::list(state.db(), &scope.team_id, &q).await?;
    let next_cursor = more
        .then(|| {
            rows.last().map(|s| {
                pagination::encode_sandbox(&After {
                    created_at: s.created_at,
                    id: s.id.clone(),
                })
            })
        })
        .flatten();
    Ok(axum::Json(SandboxPage {
        sandboxes: rows.into_iter().map(view).collect(),
        next_cursor,
    }))
}

/// One sandbox of the team, in any state.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", security(("api_key" = []), ("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = SandboxView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
) -> Result<axum::Json<SandboxView>, ApiError> {
    check_id(&id)?;
    let s = sandboxes::get(state.db(), &scope.team_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("sandbox not found"))?;
    Ok(axum::Json(view(s)))
}

/// Kills a sandbox.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", security(("api_key" = []), ("bearer" = [])),
    params(("id" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn kill(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    state
        .sandboxes
        .kill(&scope.actor(), &scope.team_id, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pauses a running sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", security(("api_key" = []), ("bearer" = [])),
    params(("id" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pause(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    state
        .sandboxes
        .pause(&scope.actor(), &scope.team_id, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resumes a paused sandbox (200 if it was already running, 201 if resumed).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", security(("api_key" = []), ("bearer" = [])),
    params(("id" = String, Path)), request_body = TimeoutBody,
    responses((status = 200, body = SandboxView), (status = 201, body = SandboxView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
    Json(body): Json<TimeoutBody>,
) -> Result<(StatusCode, axum::Json<SandboxView>), ApiError> {
    check_id(&id)?;
    Ok(
        match state
            .sandboxes
            .connect(&scope.actor(), &scope.team_id, &id, body.timeout_secs)
            .await?
        {
            Connected::AlreadyRunning(s) => (StatusCode::OK, axum::Json(view(s))),
            Connected::Resumed(s) => (StatusCode::CREATED, axum::Json(view(s))),
        },
    )
}

/// Sets a running sandbox to end `timeoutSecs` from now.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes", security(("api_key" = []), ("bearer" = [])),
    params(("id" = String, Path)), request_body = TimeoutBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn set_timeout(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
    Json(body): Json<TimeoutBody>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    state
        .sandboxes
        .set_timeout(&scope.actor(), &scope.team_id, &id, body.timeout_secs)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resource usage samples (empty while the sandbox is not running).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/metrics", tag = "sandboxes", security(("api_key" = []), ("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = Vec<Metric>), (status = 404, body = ErrorBody)))]
pub async fn metrics(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<Metric>>, ApiError> {
    check_id(&id)?;
    let samples = state.sandboxes.metrics(&scope.team_id, &id).await?;
    Ok(axum::Json(
        samples
            .into_iter()
            .map(|m| Metric {
                timestamp: rfc3339(m.timestamp_ms),
                cpu_count: m.cpu_count,
                cpu_used_pct: m.cpu_used_pct,
                mem_used: m.mem_used,
                mem_total: m.mem_total,
                disk_used: m.disk_used,
                disk_total: m.disk_total,
            })
            .collect(),
    ))
}
