//! Test harness: the whole control application on a scratch database (a SQLite file in a
//! temporary directory, or a fresh PostgreSQL database dropped afterwards), driven in-process
//! through the router with an instant worker behind it.
//!
//! PostgreSQL is reached at `ROOST_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); each test creates its own database there.

#![allow(dead_code)]

pub mod test_worker;

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use roost_control::api::internal::InternalToken;
use roost_control::api::v1::workers::WorkerRegistration;
use roost_control::api::{self, AppState, Config};
use roost_control::auth::password::HashCost;
use roost_control::lifecycle::Sandboxes;
use roost_control::pki::ControlCa;
use roost_control::placement::instant::InstantWorker;
use roost_control::ratelimit::{Budget, Limits};
use roost_control::store::Db;
use roost_control::workers::{ChannelConfig, WorkerChannel};
use serde_json::{Value, json};
use sqlx::Connection;
use tower::ServiceExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

enum Scratch {
    Dir(tempfile::TempDir),
    Database { admin_url: String, name: String },
}

#[derive(Clone)]
pub struct TestApp {
    pub router: Router,
    pub state: AppState,
    pub worker: Arc<InstantWorker>,
    pub db: Db,
    /// The QUIC worker channel, when the app places sandboxes on (test) workers over it.
    pub channel: Option<Arc<WorkerChannel>>,
    scratch: Arc<Scratch>,
}

/// A JSON response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an error response in the `{code, message}` contract.
    pub fn assert_error(&self, status: StatusCode) {
        assert_eq!(self.status, status, "body: {}", self.text);
        assert_eq!(
            self.body["code"],
            json!(status.as_u16()),
            "body: {}",
            self.text
        );
        assert!(
            self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "body: {}",
            self.text
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
    }
}

/// Credentials of a signed-up user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub team_id: String,
    pub token: String,
}

/// How a request authenticates.
#[derive(Debug, Clone, Copy)]
pub enum Auth<'a> {
    None,
    Jwt(&'a str),
    Key(&'a str),
}

fn roomy_limits() -> Limits {
    let n = |v| NonZeroU32::new(v).unwrap();
    Limits {
        per_credential: Budget {
            per_second: n(10_000),
            burst: n(10_000),
        },
        per_team: Budget {
            per_second: n(10_000),
            burst: n(10_000),
        },
    }
}

/// The gateway's internal token in tests.
pub const INTERNAL_TOKEN: &str = "test-internal-token-0123456789abcdef";

pub fn test_config() -> Config {
    let mut config = Config::new(b"test-session-secret-of-enough-length".to_vec());
    config.internal_token = Some(InternalToken::from_secret(INTERNAL_TOKEN).unwrap());
    config.password_cost = HashCost::TESTING;
    config.limits = roomy_limits();
    config.max_body_bytes = 64 * 1024;
    config
}

impl TestApp {
    pub async fn new(backend: Backend) -> Self {
        Self::with_config(backend, test_config()).await
    }

    pub async fn with_config(backend: Backend, config: Config) -> Self {
        let (db, scratch) = scratch_db(backend).await;
        let worker = Arc::new(InstantWorker::register(&db).await.unwrap());
        let state = AppState::new(Sandboxes::new(db.clone(), worker.clone()), config);
        Self {
            router: api::router(state.clone()),
            state,
            worker,
            db,
            channel: None,
            scratch: Arc::new(scratch),
        }
    }

    /// An app whose sandboxes run on workers connected over a real QUIC channel on
    /// 127.0.0.1 (port chosen by the OS), with worker registration enabled.
    pub async fn with_channel(backend: Backend, config: Config, channel: ChannelConfig) -> Self {
        let (db, scratch) = scratch_db(backend).await;
        let worker = Arc::new(InstantWorker::default());
        let ca = Arc::new(ControlCa::generate().unwrap());
        let server_name = channel.server_name.clone();
        let channel = WorkerChannel::start(db.clone(), &ca, channel)
            .await
            .unwrap();
        let registration = WorkerRegistration {
            ca,
            server_name,
            channel_address: channel.local_addr().unwrap().to_string(),
        };
        let placement = Arc::new(channel.placement());
        let state = AppState::with_workers(
            Sandboxes::new(db.clone(), placement),
            config,
            Some(registration),
        );
        Self {
            router: api::router(state.clone()),
            state,
            worker,
            db,
            channel: Some(Arc::new(channel)),
            scratch: Arc::new(scratch),
        }
    }

    pub fn channel(&self) -> &WorkerChannel {
        self.channel.as_deref().expect("app has a worker channel")
    }

    async fn cleanup(&self) {
        if let Some(channel) = &self.channel {
            channel.close();
        }
        self.db.close().await;
        if let Scratch::Database { admin_url, name } = self.scratch.as_ref() {
            let mut admin = sqlx::AnyConnection::connect(admin_url).await.unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .unwrap();
        }
    }

    /// Sends a raw request.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(path);
        match auth {
            Auth::None => {}
            Auth::Jwt(t) => req = req.header("authorization", format!("Bearer {t}")),
            Auth::Key(k) => req = req.header("x-api-key", k),
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    /// Sends a request with an optional JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<Value>,
    ) -> Resp {
        self.call_with(method, path, auth, &[], body).await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Resp {
        let mut all = headers.to_vec();
        let body = match body {
            Some(v) => {
                all.push(("content-type", "application/json"));
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        self.raw(method, path, auth, &all, body).await
    }

    pub async fn signup(&self, email: &str) -> User {
        let r = self
            .call(
                Method::POST,
                "/v1/auth/signup",
                Auth::None,
                Some(json!({"email": email, "password": "password123"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        User {
            id: r.body["userId"].as_str().unwrap().to_owned(),
            team_id: r.body["teamId"].as_str().unwrap().to_owned(),
            token: r.body["token"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn api_key(&self, user: &User) -> String {
        let path = format!("/v1/teams/{}/api-keys", user.team_id);
        let r = self
            .call(
                Method::POST,
                &path,
                Auth::Jwt(&user.token),
                Some(json!({"name": "k"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body["key"].as_str().unwrap().to_owned()
    }

    /// Creates an E2B sandbox and returns its id.
    pub async fn e2b_sandbox(&self, key: &str, body: Value) -> String {
        let r = self
            .call(Method::POST, "/v2/sandboxes", Auth::Key(key), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body["sandboxID"].as_str().unwrap().to_owned()
    }
}

/// A fresh database for `backend` and what to remove afterwards.
async fn scratch_db(backend: Backend) -> (Db, Scratch) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open_data_dir(dir.path()).await.unwrap();
            (db, Scratch::Dir(dir))
        }
        Backend::Postgres => {
            let admin_url = std::env::var("ROOST_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
            sqlx::any::install_default_drivers();
            let name = format!(
                "roost_test_{}",
                roost_control::store::random_id("", 8).unwrap()
            );
            let mut admin = sqlx::AnyConnection::connect(&admin_url)
                .await
                .expect("PostgreSQL must be reachable (set ROOST_TEST_POSTGRES_URL)");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.unwrap();
            let url = replace_database(&admin_url, &name);
            let db = Db::connect(&url).await.unwrap();
            (db, Scratch::Database { admin_url, name })
        }
    }
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let prefix = base.rsplit_once('/').map_or(base, |(p, _)| p);
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

/// Runs `scenario` on a fresh app for `backend`, always dropping the scratch database.
pub async fn run<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_with(backend, test_config(), scenario).await;
}

/// [`run`] with a custom configuration.
pub async fn run_with<F, Fut>(backend: Backend, config: Config, scenario: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let app = TestApp::with_config(backend, config).await;
    let outcome = tokio::spawn(scenario(app.clone())).await;
    app.cleanup().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Declares each listed scenario as one test per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::run($crate::common::Backend::Sqlite, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::run($crate::common::Backend::Postgres, super::$name).await;
                }
            )*
        }
    };
}

/// Worker-channel settings for tests: heartbeats every 100 ms, lost after 1.5 s (a bound the
/// loss tests wait for, yet long enough that a loaded CI machine does not lose healthy hosts).
pub fn test_channel_config() -> ChannelConfig {
    let mut c = ChannelConfig::new("127.0.0.1:0".parse().unwrap());
    c.heartbeat_interval = std::time::Duration::from_millis(100);
    c.lost_after = std::time::Duration::from_millis(1500);
    c.request_timeout = std::time::Duration::from_secs(3);
    c.hello_timeout = std::time::Duration::from_secs(5);
    c
}

/// [`run`] on an app whose sandboxes run on test workers over the QUIC channel.
pub async fn run_on_channel<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let app = TestApp::with_channel(backend, test_config(), test_channel_config()).await;
    let outcome = tokio::spawn(scenario(app.clone())).await;
    app.cleanup().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `within`; panics naming
/// `what` otherwise. For waiting on background mechanisms (heartbeats, sweeps).
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Declares each listed scenario as one channel test per backend.
#[macro_export]
macro_rules! on_both_backends_with_channel {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::run_on_channel($crate::common::Backend::Sqlite, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::run_on_channel($crate::common::Backend::Postgres, super::$name).await;
                }
            )*
        }
    };
}
