//! The HTTP API on :49999: routes, access token, body limits, errors as JSON.
//!
//! `/execute` answers at once with a streaming NDJSON body; the execution itself runs in a task
//! that waits for the context (keepalives flow meanwhile), runs the cell and feeds the body
//! through a small channel. Dropping the body — the client disconnected — closes the channel,
//! which the execution sees and answers by interrupting the kernel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::contexts::{Context, ContextError, Contexts, normalize_language};
use super::execution::{self, KEEPALIVE};
use super::wire::{CreateContextRequest, ErrorBody, ExecuteRequest, OutputLine};
use super::{env_vars, sandbox_env, wire};

/// Largest request body (code included): 16 MiB.
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Output lines buffered between the kernel and a slow client.
const OUTPUT_BUFFER: usize = 64;
/// The header carrying the sandbox's access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub contexts: Arc<Contexts>,
    /// SHA-256 of the access token, when one is required; replaced by the identity operation
    /// through the admin socket ([`super::admin`]).
    token_digest: std::sync::RwLock<Option<[u8; 32]>>,
    /// envd, asked for the sandbox's env vars ([`super::sandbox_env`]).
    envd: Option<SocketAddr>,
}

impl AppState {
    pub fn new(
        contexts: Arc<Contexts>,
        access_token: Option<&str>,
        envd: Option<SocketAddr>,
    ) -> Self {
        Self {
            contexts,
            token_digest: std::sync::RwLock::new(digest(access_token)),
            envd,
        }
    }

    /// Requires `access_token` from now on (an empty one turns the check off, as envd's
    /// `/init` does).
    pub fn set_access_token(&self, access_token: &str) {
        let token = Some(access_token).filter(|t| !t.is_empty());
        *self
            .token_digest
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = digest(token);
    }

    fn required_digest(&self) -> Option<[u8; 32]> {
        *self
            .token_digest
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn digest(access_token: Option<&str>) -> Option<[u8; 32]> {
    access_token.map(|t| Sha256::digest(t.as_bytes()).into())
}

/// The API as an axum router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/execute", post(execute))
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}", axum::routing::delete(delete_context))
        .route("/contexts/{id}/restart", post(restart_context))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_access_token,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An error reply: `{"code": N, "message": "..."}` with status N.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.status.as_u16(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ContextError> for ApiError {
    fn from(error: ContextError) -> Self {
        let status = match &error {
            ContextError::NotFound(_) => StatusCode::NOT_FOUND,
            ContextError::UnsupportedLanguage(_) | ContextError::BadCwd(_) => {
                StatusCode::BAD_REQUEST
            }
            ContextError::Start(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error_chain(&error))
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A JSON body parsed by us, so that every rejection is an [`ApiError`]: 413 past
/// [`MAX_BODY_BYTES`], 400 for bad JSON. An empty body reads as `{}`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                let status = rejection.status();
                let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    format!("request body larger than {MAX_BODY_BYTES} bytes")
                } else {
                    rejection.body_text()
                };
                ApiError::new(status, message)
            })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
    }
}

async fn require_access_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let open = request.method() == Method::GET && request.uri().path() == "/health";
    if let Some(expected) = &state.required_digest()
        && !open
    {
        let given = request
            .headers()
            .get(ACCESS_TOKEN_HEADER)
            .map(|v| <[u8; 32]>::from(Sha256::digest(v.as_bytes())));
        if given.as_ref() != Some(expected) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong X-Access-Token")
                .into_response();
        }
    }
    next.run(request).await
}

async fn health() -> Json<&'static str> {
    Json("OK")
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

async fn execute(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<ExecuteRequest>,
) -> Result<Response, ApiError> {
    if request.context_id.is_some() && request.language.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "only one of context_id or language can be given",
        ));
    }
    normalize_language(request.language.as_deref())?;
    if let Some(vars) = &request.env_vars {
        env_vars::validate(vars)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    }
    let context = match &request.context_id {
        Some(id) => Some(
            state
                .contexts
                .get(id)
                .ok_or_else(|| ContextError::NotFound(id.clone()))?,
        ),
        None => None,
    };
    let (out, lines) = mpsc::channel(OUTPUT_BUFFER);
    let envd = EnvdAccess {
        addr: state.envd,
        token: headers
            .get(ACCESS_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    tokio::spawn(run_execution(
        Arc::clone(&state.contexts),
        context,
        request,
        envd,
        out,
    ));
    Ok(ndjson_response(lines))
}

/// Where to ask for the sandbox's env vars, with the caller's token.
#[derive(Debug)]
struct EnvdAccess {
    addr: Option<SocketAddr>,
    token: Option<String>,
}

/// Waits for the context (sending keepalives), then runs the cell.
async fn run_execution(
    contexts: Arc<Contexts>,
    context: Option<Arc<Context>>,
    request: ExecuteRequest,
    envd: EnvdAccess,
    out: mpsc::Sender<OutputLine>,
) {
    let acquire = async {
        let context = match context {
            Some(context) => context,
            None => contexts.default_context().await?,
        };
        contexts.kernel_of(&context).await
    };
    tokio::pin!(acquire);
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let acquired = loop {
        tokio::select! {
            acquired = &mut acquire => break acquired,
            _ = keepalive.tick() => {
                if out.send(OutputLine::Keepalive).await.is_err() {
                    return;
                }
            }
            _ = out.closed() => return,
        }
    };
    let mut guard = match acquired {
        Ok(guard) => guard,
        Err(error) => {
            let _ = out
                .send(OutputLine::Error {
                    name: "ContextUnavailable".into(),
                    value: error_chain(&error),
                    traceback: String::new(),
                })
                .await;
            let _ = out.send(OutputLine::EndOfExecution).await;
            return;
        }
    };
    let Some(kernel) = guard.as_mut() else {
        return;
    };
    if kernel.needs_sandbox_env() {
        let vars = sandbox_env::fetch(envd.addr, envd.token.as_deref()).await;
        execution::apply_sandbox_env(kernel, vars).await;
    }
    execution::run(kernel, request.code, request.env_vars.as_ref(), &out).await;
}

fn ndjson_response(lines: mpsc::Receiver<OutputLine>) -> Response {
    let stream = futures_util::stream::unfold(lines, |mut lines| async move {
        let line = lines.recv().await?;
        let mut bytes = serde_json::to_vec(&line).unwrap_or_else(|e| {
            // Serialising our own types cannot fail; say so in-band rather than panic.
            format!(r#"{{"type":"error","name":"InternalError","value":"{e}","traceback":""}}"#)
                .into_bytes()
        });
        bytes.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(bytes)), lines))
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (headers, Body::from_stream(stream)).into_response()
}

async fn create_context(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<CreateContextRequest>,
) -> Result<Json<wire::ContextInfo>, ApiError> {
    let context = state
        .contexts
        .create(request.language.as_deref(), request.cwd.as_deref())
        .await?;
    Ok(Json(context.info()))
}

async fn list_contexts(State(state): State<Arc<AppState>>) -> Json<Vec<wire::ContextInfo>> {
    Json(state.contexts.list())
}

async fn delete_context(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.contexts.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restart_context(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.contexts.restart(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interpreter::kernel::process::{KernelCommand, KernelUser};
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use std::time::Duration;
    use tower::ServiceExt;

    /// A router whose kernels could never start: these tests must not need one.
    fn app(token: Option<&str>) -> Router {
        let command = KernelCommand {
            python: "/nonexistent/python".into(),
            user: KernelUser::lookup("root").unwrap(),
            runtime_dir: std::env::temp_dir().join("roost-interpreter-unit"),
            extra_env: Vec::new(),
        };
        let contexts = Arc::new(Contexts::new(command, "/".into(), Duration::from_secs(1)));
        router(Arc::new(AppState::new(contexts, token, None)))
    }

    async fn call(app: Router, request: Request<Body>) -> (StatusCode, Value) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
        Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap()
    }

    #[tokio::test]
    async fn malformed_json_is_a_400_json_error() {
        for body in ["{\"code\": ", "[1, 2]", "{\"code\": 5}", "not json"] {
            let (status, reply) = call(app(None), post("/execute", body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(reply["code"], 400);
            assert!(
                reply["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("invalid JSON body"),
                "{reply}"
            );
        }
        let (status, _) = call(app(None), post("/contexts", "{\"cwd\": [")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn unknown_contexts_are_404_json_errors() {
        let id = "3c1f-no-such-context";
        let execute = post(
            "/execute",
            json!({"code": "1", "context_id": id}).to_string(),
        );
        let (status, reply) = call(app(None), execute).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            reply,
            json!({"code": 404, "message": format!("context {id} not found")})
        );

        let delete = Request::delete(format!("/contexts/{id}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(app(None), delete).await.0, StatusCode::NOT_FOUND);
        let restart = post(&format!("/contexts/{id}/restart"), Body::empty());
        assert_eq!(call(app(None), restart).await.0, StatusCode::NOT_FOUND);
        let (status, reply) = call(app(None), post("/nowhere", "{}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(reply["code"], 404);
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_with_413() {
        let code = "x".repeat(MAX_BODY_BYTES + 1);
        let body = json!({ "code": code }).to_string();
        let (status, reply) = call(app(None), post("/execute", body)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(reply["code"], 413);
    }

    #[tokio::test]
    async fn contradictory_or_unsupported_requests_are_400() {
        let cases = [
            json!({"code": "1", "context_id": "a", "language": "python"}),
            json!({"code": "1", "language": "javascript"}),
            json!({"code": "1", "env_vars": {"A=B": "x"}}),
        ];
        for case in cases {
            let (status, reply) = call(app(None), post("/execute", case.to_string())).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{case}");
            assert_eq!(reply["code"], 400);
        }
        let relative = json!({"cwd": "relative/dir"}).to_string();
        let (status, reply) = call(app(None), post("/contexts", relative)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(reply["message"].as_str().unwrap().contains("relative/dir"));
        let missing = json!({"cwd": "/nonexistent/roost"}).to_string();
        assert_eq!(
            call(app(None), post("/contexts", missing)).await.0,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn a_kernel_that_cannot_start_is_a_500_with_the_reason() {
        let (status, reply) = call(app(None), post("/contexts", "")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            reply["message"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/python"),
            "{reply}"
        );
    }

    #[tokio::test]
    async fn an_execution_without_a_kernel_ends_with_an_error_line() {
        let response = app(None)
            .oneshot(post("/execute", json!({"code": "1"}).to_string()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/x-ndjson"
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let lines: Vec<Value> = String::from_utf8(bytes.to_vec())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["type"], "error");
        assert_eq!(lines[0]["name"], "ContextUnavailable");
        assert_eq!(lines[1], json!({"type": "end_of_execution"}));
    }

    #[tokio::test]
    async fn the_access_token_guards_everything_but_health() {
        let token = Some("s3cret");
        let (status, reply) = call(app(token), post("/execute", "{}")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply["code"], 401);
        let wrong = Request::get("/contexts")
            .header(ACCESS_TOKEN_HEADER, "s3cre")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(app(token), wrong).await.0, StatusCode::UNAUTHORIZED);
        let right = Request::get("/contexts")
            .header(ACCESS_TOKEN_HEADER, "s3cret")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(app(token), right).await, (StatusCode::OK, json!([])));
        let health = Request::get("/health").body(Body::empty()).unwrap();
        assert_eq!(
            call(app(token), health).await,
            (StatusCode::OK, json!("OK"))
        );
    }

    #[tokio::test]
    async fn wrong_methods_are_405_json() {
        let request = Request::put("/execute").body(Body::empty()).unwrap();
        let (status, reply) = call(app(None), request).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(reply["code"], 405);
    }
}
