//! Plain-HTTP file transfer: `GET /files?path=` streams a file out, `POST /files` streams one
//! or more in (multipart field `file` whose filename is the path, or an
//! `application/octet-stream` body with `?path=`). Files are opened with the user's
//! credentials and then streamed chunk by chunk, never held whole in memory. gzip in both
//! directions is handled by tower-http layers around these routes (see `envd/mod.rs`).
//!
//! Access: the access token, or a signed URL ([`super::signature`]) for that path, operation
//! and user.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::auth;
use super::connect::{Code, ConnectError};
use super::filesystem::metadata;
use super::fsuser::run_as;
use super::paths;
use super::signature::{self, Operation};
use super::state::Envd;
use super::users::Account;

/// Query parameters of `/files`.
#[derive(Debug, Default, Deserialize)]
pub struct FileQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<i64>,
}

/// One written file, as the SDK expects it.
#[derive(Debug, Serialize)]
pub struct WriteInfo {
    name: String,
    r#type: &'static str,
    path: String,
    /// The file's metadata as stored (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<HashMap<String, String>>,
}

/// A plain-HTTP error: `{"code": <status>, "message"}`.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<ConnectError> for HttpError {
    fn from(error: ConnectError) -> Self {
        let status = match error.code {
            Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
            code => code.http_status(),
        };
        Self::new(status, error.message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

/// Token or signature, then the account the transfer acts as.
fn authorize(
    envd: &Envd,
    headers: &HeaderMap,
    query: &FileQuery,
    operation: Operation,
) -> Result<Account, HttpError> {
    let config = envd.config();
    if let Some(token) = &config.access_token
        && !auth::token_ok(&config, headers)
    {
        let Some(given) = &query.signature else {
            return Err(HttpError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong access token (X-Access-Token) and no URL signature",
            ));
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        signature::verify(
            given,
            query.path.as_deref().unwrap_or_default(),
            operation,
            query.username.as_deref().unwrap_or_default(),
            token,
            query.signature_expiration,
            now,
        )
        .map_err(|e| HttpError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    }
    let named = match query.username.as_deref().filter(|u| !u.is_empty()) {
        Some(user) => Some(user.to_owned()),
        None => auth::basic_user(headers)?,
    };
    Ok(auth::account_for(envd, named)?)
}

fn resolve(envd: &Envd, account: &Account, path: &str) -> Result<PathBuf, HttpError> {
    Ok(paths::resolve(
        path,
        account,
        envd.config().default_workdir.as_deref(),
    )?)
}

pub async fn download(
    State(envd): State<Arc<Envd>>,
    Query(query): Query<FileQuery>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let account = authorize(&envd, &headers, &query, Operation::Read)?;
    let path = query
        .path
        .as_deref()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| HttpError::new(StatusCode::BAD_REQUEST, "`path` is required"))?;
    let path = resolve(&envd, &account, path)?;
    let opened = path.clone();
    let (file, length) = run_as(&account, move || {
        let file = std::fs::File::open(&opened)
            .map_err(|e| ConnectError::from_io(&opened.display().to_string(), &e))?;
        let metadata = file
            .metadata()
            .map_err(|e| ConnectError::from_io(&opened.display().to_string(), &e))?;
        if metadata.is_dir() {
            return Err(ConnectError::invalid(format!(
                "{} is a directory",
                opened.display()
            )));
        }
        Ok((file, metadata.len()))
    })
    .await?;
    let stream =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 * 1024);
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\\', '\r', '\n'], "_"))
        .unwrap_or_default();
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// The most of an upload's body that is still read (and discarded) after the handler stopped
/// reading it, and for how long.
const DRAIN_LIMIT: u64 = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// `request` with its body fed through a task that, once the handler stops reading (it
/// refused the upload early: a permission error, a bad path), reads the rest and throws it
/// away (up to [`DRAIN_LIMIT`] bytes within [`DRAIN_TIME`]). Without that the connection is
/// closed with request bytes unread, the kernel answers them with a reset, and the reset can
/// destroy the refusal before the client has read it.
fn drained_after_use(request: Request) -> Request {
    let (parts, body) = request.into_parts();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, axum::Error>>(8);
    tokio::spawn(async move {
        let mut body = body.into_data_stream();
        while let Some(chunk) = body.next().await {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIME;
        let mut discarded = 0u64;
        while discarded < DRAIN_LIMIT {
            match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(Some(Ok(chunk))) => discarded += chunk.len() as u64,
                Ok(Some(Err(_)) | None) | Err(_) => break,
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Request::from_parts(parts, Body::from_stream(stream))
}

pub async fn upload(
    State(envd): State<Arc<Envd>>,
    Query(query): Query<FileQuery>,
    request: Request,
) -> Result<Json<Vec<WriteInfo>>, HttpError> {
    let request = drained_after_use(request);
    let account = authorize(&envd, request.headers(), &query, Operation::Write)?;
    let metadata = metadata::from_headers(request.headers())
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, format!("invalid metadata: {e}")))?;
    let media_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match media_type.as_str() {
        "multipart/form-data" => {
            let mut multipart = Multipart::from_request(request, &())
                .await
                .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
            let mut written = Vec::new();
            while let Some(field) = multipart
                .next_field()
                .await
                .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.body_text()))?
            {
                if field.name() != Some("file") {
                    continue;
                }
                // As envd: `?path=` wins, else the part's filename is the path.
                let target = query
                    .path
                    .clone()
                    .filter(|p| !p.is_empty())
                    .or_else(|| {
                        field
                            .file_name()
                            .filter(|n| !n.is_empty())
                            .map(str::to_owned)
                    })
                    .ok_or_else(|| {
                        HttpError::new(
                            StatusCode::BAD_REQUEST,
                            "a `file` part needs `?path=` or a filename (the path)",
                        )
                    })?;
                let path = resolve(&envd, &account, &target)?;
                let chunks =
                    field.map(|chunk| chunk.map_err(|e| std::io::Error::other(e.body_text())));
                if written
                    .iter()
                    .any(|w: &WriteInfo| Path::new(&w.path) == path)
                {
                    return Err(HttpError::new(
                        StatusCode::BAD_REQUEST,
                        format!("two parts of one upload name {}", path.display()),
                    ));
                }
                written.push(write_stream(&account, &path, chunks, &metadata).await?);
            }
            if written.is_empty() {
                return Err(HttpError::new(
                    StatusCode::BAD_REQUEST,
                    "no `file` part in the form",
                ));
            }
            Ok(Json(written))
        }
        "application/octet-stream" => {
            let target = query
                .path
                .as_deref()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    HttpError::new(
                        StatusCode::BAD_REQUEST,
                        "`path` is required for an octet-stream upload",
                    )
                })?;
            let path = resolve(&envd, &account, target)?;
            let chunks = request
                .into_body()
                .into_data_stream()
                .map(|chunk| chunk.map_err(std::io::Error::other));
            Ok(Json(vec![
                write_stream(&account, &path, chunks, &metadata).await?,
            ]))
        }
        other => Err(HttpError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported content type `{other}`: use multipart/form-data or application/octet-stream"
            ),
        )),
    }
}

/// Creates (or truncates) `path` as the user, creating missing parent directories as the
/// user too, then streams `chunks` into it.
async fn write_stream(
    account: &Account,
    path: &Path,
    chunks: impl Stream<Item = std::io::Result<Bytes>>,
    metadata: &HashMap<String, String>,
) -> Result<WriteInfo, HttpError> {
    let target = path.to_path_buf();
    let file = run_as(account, move || {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                ConnectError::from_io(&format!("creating {}", parent.display()), &e)
            })?;
        }
        std::fs::File::create(&target)
            .map_err(|e| ConnectError::from_io(&target.display().to_string(), &e))
    })
    .await?;
    // One blocking thread writes the whole upload, fed through a short queue: cheaper than a
    // blocking-pool hop per network chunk, and the queue bounds what is buffered.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(32);
    let (wanted, target) = (metadata.clone(), path.to_path_buf());
    let writer = tokio::task::spawn_blocking(move || -> Result<_, ConnectError> {
        use std::io::Write;
        let mut file = file;
        let failed = |e: std::io::Error| ConnectError::from_io(&target.display().to_string(), &e);
        while let Some(chunk) = receiver.blocking_recv() {
            file.write_all(&chunk).map_err(failed)?;
        }
        // Always rewritten, so an overwrite replaces the whole set (O_TRUNC keeps xattrs).
        match metadata::replace(std::os::fd::AsFd::as_fd(&file), &wanted) {
            Ok(()) => Ok(metadata::read(&target)),
            Err(e) if metadata::unsupported(&e) => {
                tracing::debug!("{}: no xattr support, metadata dropped", target.display());
                Ok(HashMap::new())
            }
            Err(e) => Err(ConnectError::from_io(
                &format!("storing metadata on {}", target.display()),
                &e,
            )),
        }
    });
    let mut chunks = std::pin::pin!(chunks);
    let mut upload_error = None;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            // A send error means the writer stopped on an error: it reports it below.
            Ok(chunk) => {
                if sender.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                upload_error = Some(HttpError::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the upload: {e}"),
                ));
                break;
            }
        }
    }
    drop(sender);
    let stored = writer
        .await
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(error) = upload_error {
        return Err(error);
    }
    let stored = stored?;
    Ok(WriteInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        r#type: "file",
        path: path.to_string_lossy().into_owned(),
        metadata: (!stored.is_empty()).then_some(stored),
    })
}
