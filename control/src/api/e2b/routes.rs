//! E2B route handlers. Authentication is `X-API-KEY` (or a bearer token) through
//! [`TeamScope`], exactly like the native routes.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::types::{
    self, ConnectBody, E2bSandbox, E2bState, ListedSandbox, NewSandbox, SandboxDetail,
    SandboxMetric, TimeoutBody,
};
use crate::api::AppState;
use crate::api::caller::TeamScope;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{Json, Path, optional_json, query_pairs};
use crate::api::v1::sandboxes::{DEFAULT_TIMEOUT_SECS, check_id, idempotency_key};
use crate::api::{filters, pagination};
use crate::lifecycle::{Connected, CreateRequest, SandboxState};
use crate::store::sandboxes::{self, After, ListQuery};

async fn create(
    state: AppState,
    scope: TeamScope,
    headers: HeaderMap,
    req: NewSandbox,
) -> Result<(StatusCode, axum::Json<E2bSandbox>), ApiError> {
    let network = req.network.unwrap_or_default();
    let request = CreateRequest {
        template: req.template_id,
        timeout_secs: req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS),
        metadata: req.metadata.unwrap_or_default(),
        env_vars: req.env_vars.unwrap_or_default(),
        auto_pause: req.auto_pause.unwrap_or(false),
        allow_internet: req.allow_internet_access.unwrap_or(true),
        secure: req.secure.unwrap_or(false),
        allow_public_traffic: network.allow_public_traffic.unwrap_or(true),
        allow_out: network.allow_out.unwrap_or_default(),
        deny_out: network.deny_out.unwrap_or_default(),
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
    Ok((
        StatusCode::CREATED,
        axum::Json(types::sandbox(sandbox, state.config.sandbox_domain.clone())),
    ))
}

/// Creates a sandbox (older SDKs).
#[utoipa::path(post, path = "/sandboxes", tag = "e2b", security(("api_key" = [])), request_body = NewSandbox,
    params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, body = E2bSandbox), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn create_v1(
    State(state): State<AppState>,
    scope: TeamScope,
    headers: HeaderMap,
    Json(req): Json<NewSandbox>,
) -> Result<(StatusCode, axum::Json<E2bSandbox>), ApiError> {
    create(state, scope, headers, req).await
}

/// Creates a sandbox.
#[utoipa::path(post, path = "/v2/sandboxes", tag = "e2b", security(("api_key" = [])), request_body = NewSandbox,
    params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, body = E2bSandbox), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn create_v2(
    State(state): State<AppState>,
    scope: TeamScope,
    headers: HeaderMap,
    Json(req): Json<NewSandbox>,
) -> Result<(StatusCode, axum::Json<E2bSandbox>), ApiError> {
    create(state, scope, headers, req).await
}

const E2B_STATES: [SandboxState; 2] = [SandboxState::Running, SandboxState::Paused];

fn listed(rows: Vec<sandboxes::Sandbox>) -> Vec<ListedSandbox> {
    rows.into_iter()
        .filter_map(|s| E2bState::of(s.state).map(|st| types::listed(s, st)))
        .collect()
}

/// Running sandboxes (older SDKs), filtered by `metadata`; no pagination.
#[utoipa::path(get, path = "/sandboxes", tag = "e2b", security(("api_key" = [])),
    params(("metadata" = Option<String>, Query)), responses((status = 200, body = Vec<ListedSandbox>), (status = 400, body = ErrorBody)))]
pub async fn list_v1(
    State(state): State<AppState>,
    scope: TeamScope,
    RawQuery(raw): RawQuery,
) -> Result<axum::Json<Vec<ListedSandbox>>, ApiError> {
    let mut q = ListQuery {
        limit: 10_000,
        states: vec![SandboxState::Creating, SandboxState::Running],
        ..ListQuery::default()
    };
    for (k, v) in query_pairs(raw.as_deref())? {
        if k == "metadata" {
            q.metadata.extend(filters::metadata(&v)?);
        }
    }
    let (rows, _) = sandboxes::list(state.db(), &scope.team_id, &q).await?;
    Ok(axum::Json(listed(rows)))
}

/// Sandboxes filtered by `state` and `metadata`; the next page's token is in `X-Next-Token`.
#[utoipa::path(get, path = "/v2/sandboxes", tag = "e2b", security(("api_key" = [])),
    params(("metadata" = Option<String>, Query), ("state" = Option<String>, Query), ("limit" = Option<u32>, Query), ("nextToken" = Option<String>, Query)),
    responses((status = 200, body = Vec<ListedSandbox>, headers(("X-Next-Token" = String))), (status = 400, body = ErrorBody)))]
pub async fn list_v2(
    State(state): State<AppState>,
    scope: TeamScope,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut q = ListQuery {
        limit: pagination::DEFAULT_LIMIT,
        ..ListQuery::default()
    };
    for (k, v) in query_pairs(raw.as_deref())? {
        match k.as_str() {
            "state" => filters::states(&v, &E2B_STATES, &mut q.states)?,
            "metadata" => q.metadata.extend(filters::metadata(&v)?),
            "limit" => q.limit = pagination::limit(Some(&v))?,
            "nextToken" => q.after = Some(pagination::decode_sandbox(&v)?),
            _ => {}
        }
    }
    if q.states.is_empty() {
        q.states = E2B_STATES.to_vec();
    }
    if q.states.contains(&SandboxState::Running) {
        q.states.push(SandboxState::Creating);
    }
    let (rows, more) = sandboxes::list(state.db(), &scope.team_id, &q).await?;
    let next = more
        .then(|| {
            rows.last().map(|s| {
                pagination::encode_sandbox(&After {
                    created_at: s.created_at,
                    id: s.id.clone(),
                })
            })
        })
        .flatten();
    let mut response = axum::Json(listed(rows)).into_response();
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert("x-next-token", next);
    }
    Ok(response)
}

/// A sandbox as E2B shows it; lost and killed ones are not found.
#[utoipa::path(get, path = "/sandboxes/{sandboxID}", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), responses((status = 200, body = SandboxDetail), (status = 404, body = ErrorBody)))]
pub async fn info(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
) -> Result<axum::Json<SandboxDetail>, ApiError> {
    check_id(&id)?;
    let s = state.sandboxes.get_live(&scope.team_id, &id).await?;
    let st = E2bState::of(s.state).ok_or_else(|| ApiError::not_found("sandbox not found"))?;
    Ok(axum::Json(types::detail(
        s,
        st,
        state.config.sandbox_domain.clone(),
    )))
}

/// Kills a sandbox.
#[utoipa::path(delete, path = "/sandboxes/{sandboxID}", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody)))]
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

/// Sets the sandbox to end `timeout` seconds from now.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/timeout", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = TimeoutBody,
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn set_timeout(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
    Json(body): Json<TimeoutBody>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    state
        .sandboxes
        .set_timeout(&scope.actor(), &scope.team_id, &id, body.timeout)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pauses a running sandbox; 409 when it is already paused.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/pause", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
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

async fn connect(
    state: AppState,
    scope: TeamScope,
    id: String,
    body: ConnectBody,
) -> Result<(StatusCode, axum::Json<E2bSandbox>), ApiError> {
    check_id(&id)?;
    let timeout = body.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
    let domain = state.config.sandbox_domain.clone();
    Ok(
        match state
            .sandboxes
            .connect(&scope.actor(), &scope.team_id, &id, timeout)
            .await?
        {
            Connected::AlreadyRunning(s) => (StatusCode::OK, axum::Json(types::sandbox(s, domain))),
            Connected::Resumed(s) => (StatusCode::CREATED, axum::Json(types::sandbox(s, domain))),
        },
    )
}

/// Resumes a paused sandbox (201), or returns a running one (200).
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/resume", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = ConnectBody,
    responses((status = 200, body = E2bSandbox), (status = 201, body = E2bSandbox), (status = 404, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<E2bSandbox>), ApiError> {
    connect(state, scope, id, optional_json(&body)?).await
}

/// Connects to a sandbox, resuming it if paused (older SDKs).
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/connect", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = ConnectBody,
    responses((status = 200, body = E2bSandbox), (status = 201, body = E2bSandbox), (status = 404, body = ErrorBody)))]
pub async fn connect_v1(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<E2bSandbox>), ApiError> {
    connect(state, scope, id, optional_json(&body)?).await
}

/// Connects to a sandbox, resuming it if paused.
#[utoipa::path(post, path = "/v2/sandboxes/{sandboxID}/connect", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = ConnectBody,
    responses((status = 200, body = E2bSandbox), (status = 201, body = E2bSandbox), (status = 404, body = ErrorBody)))]
pub async fn connect_v2(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<E2bSandbox>), ApiError> {
    connect(state, scope, id, optional_json(&body)?).await
}

/// Resource usage samples of a sandbox.
#[utoipa::path(get, path = "/sandboxes/{sandboxID}/metrics", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), responses((status = 200, body = Vec<SandboxMetric>), (status = 404, body = ErrorBody)))]
pub async fn metrics(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<SandboxMetric>>, ApiError> {
    check_id(&id)?;
    let samples = state.sandboxes.metrics(&scope.team_id, &id).await?;
    Ok(axum::Json(samples.into_iter().map(types::metric).collect()))
}
