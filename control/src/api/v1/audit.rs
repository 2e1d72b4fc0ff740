//! The team's audit log, newest first, with cursor pagination and an action filter.
//! Admins and owners only.

use axum::extract::{RawQuery, State};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::caller::Caller;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{Path, query_pairs};
use crate::api::pagination;
use crate::api::time::rfc3339;
use crate::store::audit;
use crate::store::teams::Role;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub id: i64,
    /// `user`, `api_key` or `system`.
    pub actor_kind: String,
    pub actor_id: Option<String>,
    pub action: String,
    pub target_kind: String,
    pub target_id: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A page of the team's audit log.
#[utoipa::path(get, path = "/v1/teams/{team_id}/audit", tag = "audit", security(("bearer" = [])),
    params(("team_id" = String, Path), ("cursor" = Option<String>, Query), ("limit" = Option<u32>, Query), ("action" = Option<String>, Query)),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    Path(team_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<axum::Json<AuditPage>, ApiError> {
    caller.require_role(&state, &team_id, Role::Admin).await?;
    let (mut cursor, mut limit, mut action) = (None, None, None);
    for (k, v) in query_pairs(raw.as_deref())? {
        match k.as_str() {
            "cursor" => cursor = Some(pagination::decode_audit(&v)?),
            "limit" => limit = Some(v),
            "action" => action = Some(v),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    let limit = pagination::limit(limit.as_deref())?;
    let mut rows = audit::list(
        state.db(),
        &team_id,
        cursor,
        action.as_deref(),
        i64::from(limit) + 1,
    )
    .await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = more
        .then(|| rows.last().map(|r| pagination::encode_audit(r.id)))
        .flatten();
    let entries = rows
        .into_iter()
        .map(|r| AuditEntry {
            id: r.id,
            actor_kind: r.actor_kind,
            actor_id: r.actor_id,
            action: r.action,
            target_kind: r.target_kind,
            target_id: r.target_id,
            details: serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null),
            created_at: rfc3339(r.created_at),
        })
        .collect();
    Ok(axum::Json(AuditPage {
        entries,
        next_cursor,
    }))
}
