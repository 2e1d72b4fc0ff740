//! Sign-up and log-in with email and password; both return a session token.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::Json;
use crate::auth::password;
use crate::store::audit::{self, Actor};
use crate::store::users;

const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignupRequest {
    pub email: String,
    pub password: String,
    /// Name of the personal team created with the account.
    pub team_name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub user_id: String,
    /// The user's personal team.
    pub team_id: String,
    /// Bearer token for `Authorization`.
    pub token: String,
    /// Expiry of `token`, Unix seconds.
    pub expires_at: i64,
}

fn normalise_email(raw: &str) -> Result<String, ApiError> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && !email.chars().any(char::is_whitespace);
    if valid {
        Ok(email)
    } else {
        Err(ApiError::bad_request("email address is not valid"))
    }
}

fn now_secs() -> i64 {
    crate::store::now_ms() / 1000
}

async fn hash_blocking(state: &AppState, password: String) -> Result<String, ApiError> {
    let cost = state.config.password_cost;
    tokio::task::spawn_blocking(move || password::hash(&password, cost))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| ApiError::internal(&e))
}

/// Creates an account and its personal team.
#[utoipa::path(post, path = "/v1/auth/signup", tag = "accounts", request_body = SignupRequest,
    responses((status = 201, body = Session), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn signup(
    State(state): State<AppState>,
    Json(req): Json<SignupRequest>,
) -> Result<(StatusCode, axum::Json<Session>), ApiError> {
    let email = normalise_email(&req.email)?;
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&req.password.chars().count()) {
        return Err(ApiError::bad_request(format!(
            "password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"
        )));
    }
    let team_name = req.team_name.unwrap_or_else(|| format!("{email}'s team"));
    if team_name.trim().is_empty() || team_name.len() > 128 {
        return Err(ApiError::bad_request(
            "team name must be 1 to 128 characters",
        ));
    }
    let hash = hash_blocking(&state, req.password).await?;
    let user = users::create_with_team(state.db(), &email, &hash, &team_name)
        .await?
        .ok_or_else(|| ApiError::conflict("an account with this email already exists"))?;
    audit::record(
        state.db().pool(),
        audit::Event {
            team_id: Some(&user.default_team_id),
            actor: &Actor::User(user.id.clone()),
            action: "user.signup",
            target_kind: "user",
            target_id: Some(&user.id),
            details: serde_json::json!({}),
        },
    )
    .await?;
    let (token, expires_at) = state
        .sessions
        .issue(&user.id, now_secs())
        .map_err(|e| ApiError::internal(&e))?;
    tracing::info!(user = %user.id, "account created");
    Ok((
        StatusCode::CREATED,
        axum::Json(Session {
            user_id: user.id,
            team_id: user.default_team_id,
            token,
            expires_at,
        }),
    ))
}

/// Exchanges email and password for a session token.
#[utoipa::path(post, path = "/v1/auth/login", tag = "accounts", request_body = LoginRequest,
    responses((status = 200, body = Session), (status = 401, body = ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    Json(req): Json<LoginRequest>,
) -> Result<axum::Json<Session>, ApiError> {
    let denied = || ApiError::unauthorized("invalid email or password");
    let email = normalise_email(&req.email).map_err(|_| denied())?;
    if req.password.len() > MAX_PASSWORD * 4 {
        return Err(denied());
    }
    let user = users::by_email(state.db(), &email)
        .await?
        .ok_or_else(denied)?;
    let stored = user.password_hash.clone();
    let ok = tokio::task::spawn_blocking(move || password::verify(&req.password, &stored))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| ApiError::internal(&e))?;
    if !ok {
        return Err(denied());
    }
    let (token, expires_at) = state
        .sessions
        .issue(&user.id, now_secs())
        .map_err(|e| ApiError::internal(&e))?;
    Ok(axum::Json(Session {
        user_id: user.id,
        team_id: user.default_team_id,
        token,
        expires_at,
    }))
}
