//! Worker registration and hosts.
//!
//! A platform admin creates a one-time registration token; a new worker exchanges it, with a
//! certificate signing request for a key it generated itself, for a client certificate from
//! control's worker CA (REST rather than a QUIC handshake: the worker has no certificate yet,
//! so the exchange cannot be mutual TLS, and plain HTTPS keeps it scriptable with curl). The
//! worker then dials the QUIC control channel with that certificate.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::caller::Caller;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{Json, Path};
use crate::api::time::rfc3339;
use crate::pki::{ControlCa, PkiError};
use crate::store::audit::{self, Actor};
use crate::store::{hosts, now_ms, random_id, users, worker_tokens};

/// Longest a registration token may stay valid (7 days).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);
/// Largest accepted CSR (PEM).
const MAX_CSR_LEN: usize = 16 * 1024;

/// What registration needs: the CA that signs worker certificates and the name workers dial.
#[derive(Debug, Clone)]
pub struct WorkerRegistration {
    pub ca: Arc<ControlCa>,
    /// The server name in the channel's certificate.
    pub server_name: String,
    /// Where workers dial the channel, as told to them (e.g. `control.example:7443`).
    pub channel_address: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewToken {
    /// A label for the host the token is meant for.
    pub name: String,
    /// Validity in seconds (default 3600, at most 604800).
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    pub id: String,
    pub name: String,
    /// The secret (`rwt_` + 64 hex). Shown only in this response; single use.
    pub token: String,
    pub expires_at: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegisterWorker {
    pub token: String,
    /// PEM PKCS#10 request for the worker's own key; its subject is ignored.
    pub csr: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredWorker {
    pub worker_id: String,
    /// The worker's client certificate (PEM), CN = `workerId`.
    pub certificate_pem: String,
    /// The CA (PEM) that signed it and control's channel certificate.
    pub ca_certificate_pem: String,
    /// Name to verify control's channel certificate against.
    pub server_name: String,
    pub channel_address: String,
    /// When the certificate expires (RFC 3339); renew it over the channel before then.
    pub certificate_expires_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    pub id: String,
    pub name: String,
    /// `ready` (connected) or `lost` (not connected).
    pub state: String,
    /// No new sandboxes are placed on the host; its sandboxes keep running.
    pub draining: bool,
    pub cpu_count: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub max_sandboxes: i64,
    pub templates: Vec<String>,
    pub worker_version: Option<String>,
    pub last_heartbeat_at: Option<String>,
    pub created_at: String,
}

async fn require_platform_admin(state: &AppState, caller: &Caller) -> Result<String, ApiError> {
    let user_id = caller.user_id()?;
    if !users::is_platform_admin(state.db(), user_id).await? {
        return Err(ApiError::forbidden("this needs a platform administrator"));
    }
    Ok(user_id.to_owned())
}

fn registration(state: &AppState) -> Result<&WorkerRegistration, ApiError> {
    state.workers.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "worker registration is not enabled on this control instance",
        )
    })
}

/// Creates a one-time worker registration token (platform admins only).
#[utoipa::path(post, path = "/v1/admin/workers/registration-tokens", tag = "workers", security(("bearer" = [])),
    request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<NewToken>,
) -> Result<(StatusCode, axum::Json<CreatedToken>), ApiError> {
    let admin = require_platform_admin(&state, &caller).await?;
    registration(&state)?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad_request("name must be 1 to 128 characters"));
    }
    let ttl = req.ttl_secs.map_or(DEFAULT_TOKEN_TTL, Duration::from_secs);
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(ApiError::bad_request(format!(
            "ttlSecs must be between 1 and {}",
            MAX_TOKEN_TTL.as_secs()
        )));
    }
    let expires_at = now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    let (token, secret) = worker_tokens::create(state.db(), name, Some(&admin), expires_at).await?;
    audit::record(
        state.db().pool(),
        audit::Event {
            team_id: None,
            actor: &caller.actor(),
            action: "worker_token.create",
            target_kind: "worker_token",
            target_id: Some(&token.id),
            details: serde_json::json!({ "name": name, "expires_at": expires_at }),
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            id: token.id,
            name: token.name,
            token: secret,
            expires_at: rfc3339(token.expires_at),
        }),
    ))
}

/// Exchanges a registration token and a CSR for a worker certificate. The token is spent
/// even if a later step fails; unknown, used and expired tokens are all 401.
#[utoipa::path(post, path = "/v1/workers/register", tag = "workers",
    request_body = RegisterWorker,
    responses((status = 201, body = RegisteredWorker), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn register(
    State(state): State<AppState>,
    Json(req): Json<RegisterWorker>,
) -> Result<(StatusCode, axum::Json<RegisteredWorker>), ApiError> {
    // Unauthenticated route: one shared budget keeps token guessing slow.
    state.limits.check("worker-registration", None).await?;
    let reg = registration(&state)?;
    if req.csr.len() > MAX_CSR_LEN {
        return Err(ApiError::bad_request("csr is too large"));
    }
    if !req.token.starts_with(worker_tokens::PREFIX) || req.token.len() > 128 {
        return Err(ApiError::unauthorized(
            "invalid or expired registration token",
        ));
    }
    let worker_id = random_id("wrk_", 10)?;
    // Sign before spending the token, so a bad CSR does not burn it.
    let cert = reg
        .ca
        .issue_worker(&req.csr, &worker_id)
        .map_err(|e| match e {
            PkiError::BadCsr(_) => {
                ApiError::bad_request("csr is not a valid PEM certificate request")
            }
            other => ApiError::internal(&other),
        })?;
    let token = worker_tokens::redeem(state.db(), &req.token, now_ms())
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid or expired registration token"))?;
    hosts::register(state.db(), &worker_id, &token.name, &cert.sha256).await?;
    worker_tokens::set_host(state.db(), &token.id, &worker_id).await?;
    audit::record(
        state.db().pool(),
        audit::Event {
            team_id: None,
            actor: &Actor::System,
            action: "host.register",
            target_kind: "host",
            target_id: Some(&worker_id),
            details: serde_json::json!({ "token": token.id, "name": token.name, "cert_sha256": cert.sha256 }),
        },
    )
    .await?;
    tracing::info!(worker = %worker_id, name = %token.name, "worker registered");
    Ok((
        StatusCode::CREATED,
        axum::Json(RegisteredWorker {
            worker_id,
            certificate_pem: cert.pem,
            ca_certificate_pem: reg.ca.cert_pem().to_owned(),
            server_name: reg.server_name.clone(),
            channel_address: reg.channel_address.clone(),
            certificate_expires_at: rfc3339(cert.not_after_unix.saturating_mul(1000)),
        }),
    ))
}

/// Every host, with its state and what it reported (platform admins only).
#[utoipa::path(get, path = "/v1/admin/hosts", tag = "workers", security(("bearer" = [])),
    responses((status = 200, body = Vec<HostInfo>), (status = 403, body = ErrorBody)))]
pub async fn list_hosts(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<HostInfo>>, ApiError> {
    require_platform_admin(&state, &caller).await?;
    let list = hosts::list(state.db()).await?;
    Ok(axum::Json(list.into_iter().map(host_view).collect()))
}

fn host_view(h: hosts::Host) -> HostInfo {
    HostInfo {
        templates: serde_json::from_str(&h.templates).unwrap_or_default(),
        draining: h.draining != 0,
        id: h.id,
        name: h.name,
        state: h.state,
        cpu_count: h.cpu_count,
        memory_mb: h.memory_mb,
        disk_mb: h.disk_mb,
        max_sandboxes: h.max_sandboxes,
        worker_version: h.worker_version,
        last_heartbeat_at: h.last_heartbeat_at.map(rfc3339),
        created_at: rfc3339(h.created_at),
    }
}

async fn set_draining(
    state: &AppState,
    caller: &Caller,
    id: &str,
    draining: bool,
) -> Result<axum::Json<HostInfo>, ApiError> {
    require_platform_admin(state, caller).await?;
    if id.is_empty() || id.len() > 128 {
        return Err(ApiError::bad_request("host id must be 1 to 128 characters"));
    }
    if !hosts::set_draining(state.db(), id, draining).await? {
        return Err(ApiError::not_found("host not found"));
    }
    state.sandboxes.placement().set_draining(id, draining);
    audit::record(
        state.db().pool(),
        audit::Event {
            team_id: None,
            actor: &caller.actor(),
            action: if draining {
                "host.drain"
            } else {
                "host.undrain"
            },
            target_kind: "host",
            target_id: Some(id),
            details: serde_json::json!({}),
        },
    )
    .await?;
    tracing::info!(host = id, draining, "host drain flag changed");
    let host = hosts::get(state.db(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("host not found"))?;
    Ok(axum::Json(host_view(host)))
}

/// Stops new placements on a host; its sandboxes keep running (platform admins only).
#[utoipa::path(post, path = "/v1/admin/hosts/{host_id}/drain", tag = "workers", security(("bearer" = [])),
    params(("host_id" = String, Path)),
    responses((status = 200, body = HostInfo), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn drain_host(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<HostInfo>, ApiError> {
    set_draining(&state, &caller, &id, true).await
}

/// Lets a drained host take new sandboxes again (platform admins only).
#[utoipa::path(post, path = "/v1/admin/hosts/{host_id}/undrain", tag = "workers", security(("bearer" = [])),
    params(("host_id" = String, Path)),
    responses((status = 200, body = HostInfo), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn undrain_host(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<HostInfo>, ApiError> {
    set_draining(&state, &caller, &id, false).await
}
