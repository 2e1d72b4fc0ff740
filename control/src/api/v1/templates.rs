//! The template catalog as the calling team sees it (public templates and its own).

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::caller::TeamScope;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::Path;
use crate::api::time::rfc3339;
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
}

fn view(t: templates::Template) -> Template {
    Template {
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
