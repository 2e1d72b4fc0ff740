//! `/health`, `/envs`, and `POST /init`: the sandbox's identity, handed over by the worker.
//!
//! `/init` is served only on a private Unix socket (`--init-socket`, mode 0600, owned by
//! root), never on the TCP port: sandbox code running as `user` cannot connect to it, and
//! nothing outside the VM can reach a Unix socket inside it. The worker reaches it through
//! the agent's vsock channel (which relays the request to [`apply_init`]'s socket, or calls
//! it in-process). On the TCP port `POST /init` answers 403 and says why.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::state::Envd;

pub async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub async fn envs(State(envd): State<Arc<Envd>>) -> Json<HashMap<String, String>> {
    Json(envd.config().env_vars)
}

/// The body of `POST /init` (envd's field names).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    #[serde(alias = "sandboxID")]
    pub sandbox_id: Option<String>,
    pub env_vars: Option<HashMap<String, String>>,
    pub access_token: Option<String>,
    pub default_user: Option<String>,
    pub default_workdir: Option<PathBuf>,
    /// Wall clock of the host (RFC 3339): a restored snapshot's clock is stale.
    pub timestamp: Option<pbjson_types::Timestamp>,
}

/// Applies an init request. `set_clock` is false when the agent runs as a normal process.
pub fn apply_init(envd: &Envd, request: InitRequest, set_clock: bool) -> Result<(), String> {
    if let Some(user) = &request.default_user
        && user.is_empty()
    {
        return Err("defaultUser must not be empty".into());
    }
    if let Some(workdir) = &request.default_workdir
        && !workdir.is_absolute()
    {
        return Err("defaultWorkdir must be an absolute path".into());
    }
    if set_clock && let Some(timestamp) = &request.timestamp {
        set_wall_clock(timestamp)?;
    }
    envd.update_config(|config| {
        if let Some(id) = request.sandbox_id {
            config.sandbox_id = Some(id);
        }
        if let Some(env_vars) = request.env_vars {
            config.env_vars.extend(env_vars);
        }
        if let Some(token) = request.access_token {
            config.access_token = (!token.is_empty()).then_some(token);
        }
        if let Some(user) = request.default_user {
            config.default_user = user;
        }
        if let Some(workdir) = request.default_workdir {
            config.default_workdir = Some(workdir);
        }
    });
    Ok(())
}

fn set_wall_clock(timestamp: &pbjson_types::Timestamp) -> Result<(), String> {
    let time = libc::timespec {
        tv_sec: timestamp.seconds,
        tv_nsec: i64::from(timestamp.nanos),
    };
    // SAFETY: clock_settime reads one timespec from a pointer to a live local.
    let result = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) };
    if result == 0 {
        Ok(())
    } else {
        Err(format!(
            "setting the clock: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// `POST /init` on the private socket.
pub async fn init(
    State((envd, set_clock)): State<(Arc<Envd>, bool)>,
    body: axum::body::Bytes,
) -> Response {
    let request: InitRequest = if body.is_empty() {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("bad init body: {e}")).into_response();
            }
        }
    };
    match apply_init(&envd, request, set_clock) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    }
}

/// `POST /init` on the public port.
pub async fn init_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        "/init is accepted only from the worker's channel (the agent's private socket)",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envd::state::SandboxConfig;

    #[test]
    fn init_sets_identity_and_merges_variables() {
        let envd = Envd::new(SandboxConfig::default());
        let request: InitRequest = serde_json::from_str(
            r#"{"sandboxId":"cl-1","envVars":{"A":"1"},"accessToken":"t","defaultUser":"root",
                "defaultWorkdir":"/srv","timestamp":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        apply_init(&envd, request, false).unwrap();
        let config = envd.config();
        assert_eq!(config.sandbox_id.as_deref(), Some("cl-1"));
        assert_eq!(config.env_vars["A"], "1");
        assert_eq!(config.access_token.as_deref(), Some("t"));
        assert_eq!(config.default_user, "root");
        assert_eq!(
            config.default_workdir.as_deref(),
            Some(std::path::Path::new("/srv"))
        );
        let relative = InitRequest {
            default_workdir: Some("srv".into()),
            ..Default::default()
        };
        assert!(apply_init(&envd, relative, false).is_err());
    }
}
