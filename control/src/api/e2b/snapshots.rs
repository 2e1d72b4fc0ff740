//! E2B snapshot routes: `POST /sandboxes/{sandboxID}/snapshots`, `GET /snapshots` and
//! `DELETE /templates/{templateID}`, with E2B's field names (`snapshotID`, `names`) and
//! pagination (`limit`, `nextToken`, `X-Next-Token`).
//!
//! E2B's `snapshotID` is what the SDK passes back as `templateID` to create a sandbox from the
//! snapshot: here the snapshot's template id. `names` lists the snapshot's team-scoped name
//! when it has one, else its id (E2B adds a team namespace and `:tag`; Roost templates have
//! neither).

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::caller::TeamScope;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{Path, optional_json};
use crate::api::v1::sandboxes::check_id;
use crate::api::v1::templates::{check_template_id, next_cursor, snapshot_query};
use crate::store::templates::{self, Template};

/// Body of `POST /sandboxes/{sandboxID}/snapshots` (may be empty). Unknown fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct NewSnapshot {
    /// Optional name; reusing a name moves it to the new snapshot.
    pub name: Option<String>,
}

/// E2B `SnapshotInfo`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

fn info(t: Template) -> SnapshotInfo {
    SnapshotInfo {
        names: vec![t.name.unwrap_or_else(|| t.id.clone())],
        snapshot_id: t.id,
    }
}

/// Saves a running sandbox as a snapshot template.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/snapshots", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = NewSnapshot,
    responses((status = 201, body = SnapshotInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_snapshot(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<SnapshotInfo>), ApiError> {
    check_id(&id)?;
    let body: NewSnapshot = optional_json(&body)?;
    let t = state
        .sandboxes
        .snapshot(&scope.actor(), &scope.team_id, &id, body.name.as_deref())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(info(t))))
}

/// The team's snapshots, newest first; `sandboxID` filters by source sandbox; the next page's
/// token is in `X-Next-Token`.
#[utoipa::path(get, path = "/snapshots", tag = "e2b", security(("api_key" = [])),
    params(("sandboxID" = Option<String>, Query), ("limit" = Option<u32>, Query), ("nextToken" = Option<String>, Query)),
    responses((status = 200, body = Vec<SnapshotInfo>, headers(("X-Next-Token" = String))), (status = 400, body = ErrorBody)))]
pub async fn list_snapshots(
    State(state): State<AppState>,
    scope: TeamScope,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (sandbox, after, limit) = snapshot_query(raw.as_deref(), "sandboxID", "nextToken", false)?;
    let (rows, more) = templates::list_snapshots(
        state.db(),
        &scope.team_id,
        sandbox.as_deref(),
        after.as_ref(),
        limit,
    )
    .await?;
    let next = next_cursor(&rows, more);
    let list: Vec<SnapshotInfo> = rows.into_iter().map(info).collect();
    let mut response = axum::Json(list).into_response();
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert("x-next-token", next);
    }
    Ok(response)
}

/// Deletes one of the team's templates (a snapshot); 404 when unknown.
#[utoipa::path(delete, path = "/templates/{templateID}", tag = "e2b", security(("api_key" = [])),
    params(("templateID" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_template(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_template_id(&id)?;
    state
        .sandboxes
        .delete_template(&scope.actor(), &scope.team_id, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
