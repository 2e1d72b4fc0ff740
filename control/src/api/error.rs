//! The error contract: every failure is JSON `{code, message}` where `code` is the HTTP status
//! (E2B's `Error` schema), with `Should-Retry: false` when retrying cannot help and
//! `Retry-After` when waiting will.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::lifecycle::LifecycleError;
use crate::placement::PlacementError;
use crate::ratelimit::Exceeded;
use crate::store::StoreError;

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The HTTP status code, repeated.
    pub code: u16,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Clients may retry by their own rules (5xx).
    Default,
    /// `Should-Retry: false`: the same request will fail the same way.
    Never,
    /// `Retry-After`: the same request will pass after this wait.
    After(Duration),
}

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry: Retry,
}

impl ApiError {
    /// A 4xx is final unless it is a 429 or 408; a 5xx may be retried.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let retry = if status.is_client_error()
            && status != StatusCode::TOO_MANY_REQUESTS
            && status != StatusCode::REQUEST_TIMEOUT
        {
            Retry::Never
        } else {
            Retry::Default
        };
        Self {
            status,
            message: message.into(),
            retry,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    /// An unexpected failure: logged in full here, reported to the client without detail.
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %ErrorChain(error), "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    fn retry_after(mut self, wait: Duration) -> Self {
        self.retry = Retry::After(wait);
        self
    }

    fn never_retry(mut self) -> Self {
        self.retry = Retry::Never;
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// Displays an error with its `source()` chain, for logs.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.status.as_u16(),
            message: self.message,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self.retry {
            Retry::Default => {}
            Retry::Never => {
                headers.insert("should-retry", HeaderValue::from_static("false"));
            }
            Retry::After(wait) => {
                // Round up: a client that waits the whole seconds given must then pass.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                headers.insert("retry-after", HeaderValue::from(secs.max(1)));
            }
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::internal(&e)
    }
}

impl From<Exceeded> for ApiError {
    fn from(e: Exceeded) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded").retry_after(e.retry_after)
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        use LifecycleError as L;
        match e {
            L::Invalid(m) => Self::bad_request(m),
            L::NotFound => Self::not_found("sandbox not found"),
            L::TemplateNotFound(_) => Self::not_found(e.to_string()),
            L::Forbidden(m) => Self::forbidden(m),
            L::Conflict { .. } | L::IdempotencyMismatch => Self::conflict(e.to_string()),
            L::IdempotencyInProgress => {
                Self::conflict(e.to_string()).retry_after(Duration::from_secs(1))
            }
            L::Worker { ref source, .. } => {
                // Say what went wrong without naming hosts, which are not the tenant's business.
                let message = match source {
                    PlacementError::NoCapacity { template } => format!(
                        "no worker has capacity for template {template:?} right now; retry later"
                    ),
                    PlacementError::NoTemplateHost { template } => {
                        format!("no connected worker offers template {template:?}")
                    }
                    PlacementError::HostUnavailable { .. } | PlacementError::Timeout { .. } => {
                        format!("{e}: its worker is unreachable; retry later")
                    }
                    PlacementError::UnknownSandbox { .. } | PlacementError::Refused { .. } => {
                        format!("{e}: {source}")
                    }
                };
                tracing::warn!(error = %ErrorChain(&e), "worker request failed");
                match source {
                    // Transient: a worker frees capacity or reconnects. Clients retry (the E2B
                    // SDK retries 503 unless told otherwise) after the hinted wait.
                    PlacementError::NoCapacity { .. }
                    | PlacementError::HostUnavailable { .. }
                    | PlacementError::Timeout { .. } => {
                        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
                            .retry_after(Duration::from_secs(1))
                    }
                    // No worker offers the template: the same request fails the same way until
                    // an operator adds one, so clients must not hammer.
                    PlacementError::NoTemplateHost { .. } => {
                        Self::new(StatusCode::SERVICE_UNAVAILABLE, message).never_retry()
                    }
                    PlacementError::UnknownSandbox { .. } | PlacementError::Refused { .. } => {
                        Self::new(StatusCode::BAD_GATEWAY, message).never_retry()
                    }
                }
            }
            L::Store(_) | L::Id(_) => Self::internal(&e),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::new(r.status(), r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::new(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::new(r.status(), r.body_text())
    }
}
