//! API keys of a team. The secret is in the create response only; listings show the prefix.
//! Any member may create keys and revoke their own; admins may revoke any.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::caller::Caller;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{Json, Path};
use crate::api::time::rfc3339;
use crate::auth::api_key;
use crate::store::api_keys::{self, ApiKey};
use crate::store::audit;
use crate::store::teams::Role;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub created_by: Option<String>,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    #[serde(flatten)]
    pub info: KeyInfo,
    /// The secret (`e2b_` + 40 hex). Shown only in this response.
    pub key: String,
}

fn info(k: ApiKey) -> KeyInfo {
    KeyInfo {
        id: k.id,
        name: k.name,
        prefix: k.prefix,
        created_by: k.created_by,
        created_at: rfc3339(k.created_at),
        last_used_at: k.last_used_at.map(rfc3339),
        revoked_at: k.revoked_at.map(rfc3339),
    }
}

/// Issues a new API key for the team.
#[utoipa::path(post, path = "/v1/teams/{team_id}/api-keys", tag = "api keys", security(("bearer" = [])),
    params(("team_id" = String, Path)), request_body = NewKey,
    responses((status = 201, body = CreatedKey), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(team_id): Path<String>,
    Json(req): Json<NewKey>,
) -> Result<(StatusCode, axum::Json<CreatedKey>), ApiError> {
    caller.require_role(&state, &team_id, Role::Member).await?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad_request(
            "key name must be 1 to 128 characters",
        ));
    }
    let user_id = caller.user_id()?;
    let new = api_key::generate().map_err(|e| ApiError::internal(&e))?;
    let stored = api_keys::insert(
        state.db(),
        &team_id,
        user_id,
        name,
        &new.display_prefix,
        &new.sha256,
    )
    .await?;
    audit::record(
        state.db().pool(),
        audit::Event {
            team_id: Some(&team_id),
            actor: &caller.actor(),
            action: "api_key.create",
            target_kind: "api_key",
            target_id: Some(&stored.id),
            details: serde_json::json!({ "name": name }),
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedKey {
            info: info(stored),
            key: new.secret,
        }),
    ))
}

/// The team's keys, newest first, without secrets.
#[utoipa::path(get, path = "/v1/teams/{team_id}/api-keys", tag = "api keys", security(("bearer" = [])),
    params(("team_id" = String, Path)), responses((status = 200, body = Vec<KeyInfo>), (status = 404, body = ErrorBody)))]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    Path(team_id): Path<String>,
) -> Result<axum::Json<Vec<KeyInfo>>, ApiError> {
    caller.require_role(&state, &team_id, Role::Member).await?;
    let keys = api_keys::list(state.db(), &team_id).await?;
    Ok(axum::Json(keys.into_iter().map(info).collect()))
}

/// Revokes a key at once.
#[utoipa::path(delete, path = "/v1/teams/{team_id}/api-keys/{key_id}", tag = "api keys", security(("bearer" = [])),
    params(("team_id" = String, Path), ("key_id" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((team_id, key_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let role = caller.require_role(&state, &team_id, Role::Member).await?;
    let key = api_keys::get(state.db(), &team_id, &key_id)
        .await?
        .ok_or_else(|| ApiError::not_found("API key not found"))?;
    let own = key.created_by.as_deref() == Some(caller.user_id()?);
    if !own && role < Role::Admin {
        return Err(ApiError::forbidden(
            "only admins can revoke other members' keys",
        ));
    }
    if !api_keys::revoke(state.db(), &team_id, &key_id).await? {
        return Err(ApiError::not_found("API key not found"));
    }
    audit::record(
        state.db().pool(),
        audit::Event {
            team_id: Some(&team_id),
            actor: &caller.actor(),
            action: "api_key.revoke",
            target_kind: "api_key",
            target_id: Some(&key_id),
            details: serde_json::json!({}),
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
