//! The template catalog as the calling team sees it (public templates and its own), and the
//! team's snapshots: taking one of a running sandbox, listing them, deleting a team template.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::caller::TeamScope;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{Path, optional_json, query_pairs};
use crate::api::pagination;
use crate::api::time::rfc3339;
use crate::api::v1::sandboxes::check_id;
use crate::store::sandboxes::After;
use crate::store::templates;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    pub id: String,
    pub alias: Option<String>,
    /// Whether every team can use it.
    pub public: bool,
    pub cpu_count: i64,
    pub memory_mb: i64,
    pub disk_size_mb: i64,
    pub envd_version: String,
    pub created_at: String,
    /// `template` (built by the image pipeline) or `snapshot` (saved from a sandbox).
    pub kind: String,
    /// A snapshot's team-scoped name (usable wherever a template id is).
    pub name: Option<String>,
    /// The sandbox a snapshot was taken of.
    pub source_sandbox_id: Option<String>,
    pub size_bytes: Option<i64>,
}

pub fn view(t: templates::Template) -> Template {
    Template {
        kind: t.kind,
        name: t.name,
        source_sandbox_id: t.source_sandbox_id,
        size_bytes: t.size_bytes,
        public: t.team_id.is_none(),
        id: t.id,
        alias: t.alias,
        cpu_count: t.cpu_count,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        envd_version: t.envd_version,
        created_at: rfc3339(t.created_at),
    }
}

/// Templates the caller's team can create sandboxes from.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, body = Vec<Template>)))]
pub async fn list_templates(
    State(state): State<AppState>,
    scope: TeamScope,
) -> Result<axum::Json<Vec<Template>>, ApiError> {
    let list = templates::list_visible(state.db(), &scope.team_id).await?;
    Ok(axum::Json(list.into_iter().map(view).collect()))
}

/// One template, by id or alias.
#[utoipa::path(get, path = "/v1/templates/{template_id}", tag = "templates", security(("api_key" = []), ("bearer" = [])),
    params(("template_id" = String, Path)), responses((status = 200, body = Template), (status = 404, body = ErrorBody)))]
pub async fn get_template(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
) -> Result<axum::Json<Template>, ApiError> {
    let t = templates::visible(state.db(), &scope.team_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("template not found"))?;
    Ok(axum::Json(view(t)))
}

/// Body of `POST /v1/sandboxes/{id}/snapshots` (may be empty).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSnapshot {
    /// Team-scoped name; reusing one moves it to the new snapshot.
    pub name: Option<String>,
}

/// Saves a running sandbox as a snapshot template (the sandbox keeps running). Create
/// sandboxes from it with its `id` (or `name`) as the template.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshots", tag = "templates", security(("api_key" = []), ("bearer" = [])),
    params(("id" = String, Path)), request_body = NewSnapshot,
    responses((status = 201, body = Template), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_snapshot(
    State(state): State<AppState>,
    scope: TeamScope,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Template>), ApiError> {
    check_id(&id)?;
    let body: NewSnapshot = optional_json(&body)?;
    let t = state
        .sandboxes
        .snapshot(&scope.actor(), &scope.team_id, &id, body.name.as_deref())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(view(t))))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPage {
    pub snapshots: Vec<Template>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Query of the snapshot lists, shared with the E2B route: `(sandbox filter, cursor, limit)`.
pub fn snapshot_query(
    raw: Option<&str>,
    sandbox_key: &str,
    cursor_key: &str,
    strict: bool,
) -> Result<(Option<String>, Option<After>, u32), ApiError> {
    let (mut sandbox, mut after, mut limit) = (None, None, pagination::DEFAULT_LIMIT);
    for (k, v) in query_pairs(raw)? {
        if k == sandbox_key {
            check_id(&v)?;
            sandbox = Some(v);
        } else if k == cursor_key {
            after = Some(pagination::decode_sandbox(&v)?);
        } else if k == "limit" {
            limit = pagination::limit(Some(&v))?;
        } else if strict {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}"
            )));
        }
    }
    Ok((sandbox, after, limit))
}

/// The cursor after the last row of a page that has more.
pub fn next_cursor(rows: &[templates::Template], more: bool) -> Option<String> {
    more.then(|| {
        rows.last().map(|t| {
            pagination::encode_sandbox(&After {
                created_at: t.created_at,
                id: t.id.clone(),
            })
        })
    })
    .flatten()
}

/// The team's snapshots, newest first. Filters: `sandboxId`; pagination: `limit`, `cursor`.
#[utoipa::path(get, path = "/v1/snapshots", tag = "templates", security(("api_key" = []), ("bearer" = [])),
    params(("sandboxId" = Option<String>, Query), ("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = SnapshotPage), (status = 400, body = ErrorBody)))]
pub async fn list_snapshots(
    State(state): State<AppState>,
    scope: TeamScope,
    RawQuery(raw): RawQuery,
) -> Result<axum::Json<SnapshotPage>, ApiError> {
    let (sandbox, after, limit) = snapshot_query(raw.as_deref(), "sandboxId", "cursor", true)?;
    let (rows, more) = templates::list_snapshots(
        state.db(),
        &scope.team_id,
        sandbox.as_deref(),
        after.as_ref(),
        limit,
    )
    .await?;
    let next_cursor = next_cursor(&rows, more);
    Ok(axum::Json(SnapshotPage {
        snapshots: rows.into_iter().map(view).collect(),
        next_cursor,
    }))
}

/// Deletes one of the team's own templates or snapshots (by id or snapshot name); public
/// templates are 403.
#[utoipa::path(delete, path = "/v1/templates/{template_id}", tag = "templates", security(("api_key" = []), ("bearer" = [])),
    params(("template_id" = String, Path)),
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

/// A path template id or name longer than any stored one is refused before any lookup.
pub fn check_template_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 128 {
        return Err(ApiError::bad_request(
            "template id must be 1 to 128 characters",
        ));
    }
    Ok(())
}
