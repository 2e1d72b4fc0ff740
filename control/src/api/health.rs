//! `GET /health`: whether this instance can serve (its database answers). Unauthenticated, for
//! load balancers and process supervisors.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` in a 200 answer.
    pub status: &'static str,
}

/// 200 `{"status":"ok"}` while the database answers, 503 JSON otherwise.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
pub async fn health(State(state): State<AppState>) -> Result<axum::Json<Health>, ApiError> {
    match sqlx::query("SELECT 1").execute(state.db().pool()).await {
        Ok(_) => Ok(axum::Json(Health { status: "ok" })),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unavailable");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable",
            ))
        }
    }
}
