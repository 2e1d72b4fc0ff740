//! The interpreter's private admin socket: `POST /init` with envd's body shape
//! (`{"accessToken": "..."}`, other fields ignored) replaces the access token required on
//! :49999. A template's interpreter starts without a token; each restored clone gets its own
//! from the worker through the agent's identity operation, which posts here.
//!
//! The socket is mode 0600 and owned by root (the interpreter runs as root; its kernels run as
//! the sandbox user and cannot connect), and it is never reachable from outside the VM.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;

use super::server::AppState;

/// The part of envd's `/init` body the interpreter uses.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitBody {
    access_token: Option<String>,
}

/// Binds `socket` now and serves it on a task.
pub fn serve(socket: &Path, state: Arc<AppState>) -> anyhow::Result<()> {
    let listener = crate::envd::bind_private_socket(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    let app = Router::new().route("/init", post(init)).with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("admin socket stopped: {e}");
        }
    });
    Ok(())
}

async fn init(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let body: InitBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad init body: {e}")).into_response(),
    };
    if let Some(token) = body.access_token {
        state.set_access_token(&token);
        tracing::info!("access token replaced");
    }
    StatusCode::NO_CONTENT.into_response()
}
