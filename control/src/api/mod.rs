//! The HTTP surface: native `/v1` routes, the E2B-compatible routes, and `/openapi.json`
//! generated from the handlers' annotations (utoipa), so the document cannot drift from the
//! code. Handlers are thin: they parse, call [`crate::lifecycle`] or [`crate::store`] with the
//! caller's team, and render.

pub mod caller;
pub mod e2b;
pub mod error;
pub mod extract;
pub mod filters;
pub mod health;
pub mod internal;
pub mod pagination;
pub mod time;
pub mod v1;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::error::ApiError;
use crate::auth::jwt::SessionKeys;
use crate::auth::password::HashCost;
use crate::lifecycle::Sandboxes;
use crate::ratelimit::{Limits, RateLimits};
use crate::store::Db;

/// Settings of the HTTP API.
#[derive(Clone)]
pub struct Config {
    /// Secret that signs session tokens (at least 32 random bytes in production).
    pub session_secret: Vec<u8>,
    pub session_ttl: Duration,
    pub password_cost: HashCost,
    pub limits: Limits,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Domain reported to E2B clients (`domain` in sandbox responses); `None` lets the SDK use
    /// its own configured domain.
    pub sandbox_domain: Option<String>,
    /// Rate-limit windows shared with other control instances (Redis); `None` keeps them in
    /// this process.
    pub shared_limits: Option<crate::ratelimit::shared::SharedWindows>,
    /// The gateway's token for `/internal/v1` (only its hash); `None` disables those routes.
    pub internal_token: Option<internal::InternalToken>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("session_ttl", &self.session_ttl)
            .field("password_cost", &self.password_cost)
            .field("limits", &self.limits)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("sandbox_domain", &self.sandbox_domain)
            .field("shared_limits", &self.shared_limits)
            .field("internal_token", &self.internal_token)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Production defaults around the given session secret.
    pub fn new(session_secret: Vec<u8>) -> Self {
        Self {
            session_secret,
            session_ttl: Duration::from_secs(12 * 60 * 60),
            password_cost: HashCost::RECOMMENDED,
            limits: Limits::default(),
            max_body_bytes: 256 * 1024,
            sandbox_domain: None,
            shared_limits: None,
            internal_token: None,
        }
    }
}

/// Everything a handler needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub sandboxes: Sandboxes,
    pub sessions: SessionKeys,
    pub limits: RateLimits,
    pub config: Config,
    /// Worker registration; `None` when this instance runs no worker channel.
    pub workers: Option<v1::workers::WorkerRegistration>,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(sandboxes: Sandboxes, config: Config) -> Self {
        Self::with_workers(sandboxes, config, None)
    }

    /// State that also registers workers for the QUIC control channel.
    pub fn with_workers(
        sandboxes: Sandboxes,
        config: Config,
        workers: Option<v1::workers::WorkerRegistration>,
    ) -> Self {
        Self(Arc::new(Inner {
            sessions: SessionKeys::new(&config.session_secret, config.session_ttl),
            limits: RateLimits::new(config.limits).with_shared(config.shared_limits.clone()),
            sandboxes,
            config,
            workers,
        }))
    }

    pub fn db(&self) -> &Db {
        self.sandboxes.db()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Roost control API", description = "Native /v1 routes and the E2B-compatible sandbox API."),
    modifiers(&SecuritySchemes),
    components(schemas(error::ErrorBody))
)]
struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-KEY"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The documented routes, before state is attached.
fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(v1::accounts::signup))
        .routes(routes!(v1::accounts::login))
        .routes(routes!(v1::teams::create_team, v1::teams::list_teams))
        .routes(routes!(v1::teams::list_members, v1::teams::add_member))
        .routes(routes!(
            v1::teams::set_member_role,
            v1::teams::remove_member
        ))
        .routes(routes!(v1::keys::create_key, v1::keys::list_keys))
        .routes(routes!(v1::keys::revoke_key))
        .routes(routes!(v1::audit::list_audit))
        .routes(routes!(v1::templates::list_templates))
        .routes(routes!(
            v1::templates::get_template,
            v1::templates::delete_template
        ))
        .routes(routes!(v1::templates::list_snapshots))
        .routes(routes!(v1::templates::create_snapshot))
        .routes(routes!(v1::sandboxes::create, v1::sandboxes::list))
        .routes(routes!(v1::sandboxes::get, v1::sandboxes::kill))
        .routes(routes!(v1::sandboxes::pause))
        .routes(routes!(v1::sandboxes::resume))
        .routes(routes!(v1::sandboxes::set_timeout))
        .routes(routes!(v1::sandboxes::metrics))
        .routes(routes!(v1::workers::create_token))
        .routes(routes!(v1::workers::register))
        .routes(routes!(v1::workers::list_hosts))
        .routes(routes!(v1::workers::drain_host))
        .routes(routes!(v1::workers::undrain_host))
        .routes(routes!(e2b::routes::create_v1, e2b::routes::list_v1))
        .routes(routes!(e2b::routes::create_v2, e2b::routes::list_v2))
        .routes(routes!(e2b::routes::info, e2b::routes::kill))
        .routes(routes!(e2b::routes::set_timeout))
        .routes(routes!(e2b::routes::pause))
        .routes(routes!(e2b::routes::resume))
        .routes(routes!(e2b::routes::connect_v1))
        .routes(routes!(e2b::routes::connect_v2))
        .routes(routes!(e2b::routes::metrics))
        .routes(routes!(e2b::snapshots::create_snapshot))
        .routes(routes!(e2b::snapshots::list_snapshots))
        .routes(routes!(e2b::snapshots::delete_template))
        .routes(routes!(internal::get_route))
        .routes(routes!(internal::route_events))
        .routes(routes!(internal::resume))
}

/// The OpenAPI document of every route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

/// The complete HTTP application.
pub fn router(state: AppState) -> Router {
    let (router, doc) = documented().split_for_parts();
    let doc = Arc::new(doc);
    let max_body = state.config.max_body_bytes;
    router
        .route(
            "/openapi.json",
            get(move || async move { axum::Json(doc.as_ref().clone()) }),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Serves the application on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "control API listening");
    axum::serve(listener, router(state)).await
}
