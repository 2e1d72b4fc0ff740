//! Rate-limit windows shared through Redis: run out like local ones, are shared by several
//! control instances, and fall back to local windows when Redis stops answering. Needs Redis at
//! `ROOST_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); each test uses its own key prefix.

mod common;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::{Auth, Backend, TestApp};
use roost_control::api::{self, AppState};
use roost_control::ratelimit::shared::{SharedError, SharedWindows};
use roost_control::ratelimit::{Budget, Limits, RateLimits};
use tower::ServiceExt;

fn redis_url() -> String {
    std::env::var("ROOST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn windows() -> SharedWindows {
    let prefix = roost_control::store::random_id("roost-test-", 6).unwrap() + ":";
    SharedWindows::connect(&redis_url(), &prefix)
        .await
        .expect("Redis must be reachable (set ROOST_TEST_REDIS_URL)")
}

fn budget(per_second: u32, burst: u32) -> Budget {
    Budget {
        per_second: NonZeroU32::new(per_second).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

fn tight() -> Limits {
    Limits {
        per_credential: budget(1, 3),
        per_team: budget(1, 100),
    }
}

#[tokio::test]
async fn a_shared_window_runs_out_and_reports_a_wait() {
    let w = windows().await;
    let b = budget(1, 2);
    assert!(w.check("cred", "k1", b).await.unwrap().is_ok());
    assert!(w.check("cred", "k1", b).await.unwrap().is_ok());
    let wait = w
        .check("cred", "k1", b)
        .await
        .unwrap()
        .unwrap_err()
        .retry_after;
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    // Other ids and scopes have their own windows.
    assert!(w.check("cred", "k2", b).await.unwrap().is_ok());
    assert!(w.check("team", "k1", b).await.unwrap().is_ok());
}

#[tokio::test]
async fn two_instances_spend_from_one_budget() {
    let w = windows().await;
    let a = RateLimits::new(tight()).with_shared(Some(w.clone()));
    let b = RateLimits::new(tight()).with_shared(Some(w));
    let mut allowed = 0;
    for i in 0..8 {
        let limits = if i % 2 == 0 { &a } else { &b };
        if limits.check("key", Some("team")).await.is_ok() {
            allowed += 1;
        }
    }
    // Each instance alone would allow 3 (6 together); shared, the burst is 3 in total.
    assert_eq!(allowed, 3);
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_at_connect() {
    // Port 1 on loopback: nothing listens there.
    let err = SharedWindows::connect("redis://127.0.0.1:1", "x:")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SharedError::Redis(_) | SharedError::Timeout),
        "{err:?}"
    );
}

/// A TCP proxy to the test Redis that can be switched to swallow everything (a hung Redis
/// or a network cut, as the client sees it).
struct Blackhole {
    addr: std::net::SocketAddr,
    dark: Arc<AtomicBool>,
    forwarding: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Blackhole {
    async fn start() -> Self {
        let upstream = redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dark = Arc::new(AtomicBool::new(false));
        let forwarding = Arc::new(Mutex::new(Vec::new()));
        let (d, f) = (dark.clone(), forwarding.clone());
        tokio::spawn(async move {
            let mut swallowed = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    swallowed.push(client);
                    continue;
                }
                let upstream = upstream.clone();
                f.lock().unwrap().push(tokio::spawn(async move {
                    let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }));
            }
        });
        Self {
            addr,
            dark,
            forwarding,
        }
    }

    fn go_dark(&self) {
        self.dark.store(true, Ordering::SeqCst);
        for task in self.forwarding.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

#[tokio::test]
async fn a_failing_redis_falls_back_to_local_windows() {
    let proxy = Blackhole::start().await;
    let prefix = roost_control::store::random_id("roost-test-", 6).unwrap() + ":";
    let shared = SharedWindows::connect(&format!("redis://{}", proxy.addr), &prefix)
        .await
        .expect("Redis must be reachable (set ROOST_TEST_REDIS_URL)");
    let limits = RateLimits::new(tight()).with_shared(Some(shared.clone()));
    // Through Redis: spends the shared window only.
    assert!(limits.check("key", None).await.is_ok());
    assert!(shared.check("probe", "p", budget(1, 1)).await.is_ok());

    proxy.go_dark();
    assert!(
        shared.check("probe", "p", budget(1, 1)).await.is_err(),
        "Redis must be unusable now"
    );
    // Every check now fails over to the untouched local window, which still enforces the budget.
    for _ in 0..3 {
        assert!(limits.check("key", None).await.is_ok());
    }
    assert!(limits.check("key", None).await.is_err());
}

async fn instances_behind_the_api_share_the_budget(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    // A second control instance on the same database and Redis.
    let other = api::router(AppState::new(
        app.state.sandboxes.clone(),
        app.state.config.clone(),
    ));
    let mut statuses = Vec::new();
    for i in 0..4 {
        let request = axum::http::Request::builder()
            .method(Method::GET)
            .uri("/v2/sandboxes")
            .header("x-api-key", &key)
            .body(axum::body::Body::empty())
            .unwrap();
        let router = if i % 2 == 0 {
            app.router.clone()
        } else {
            other.clone()
        };
        let response = router.oneshot(request).await.unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(response.status());
    }
    // The key is fresh (it was created with the user's session), so its burst of 3 allows
    // three listings in total across both instances, not three on each.
    assert_eq!(
        statuses,
        vec![
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let r = app
        .call(Method::GET, "/v2/sandboxes", Auth::Key(&key), None)
        .await;
    r.assert_error(StatusCode::TOO_MANY_REQUESTS);
}

async fn run_shared(backend: Backend) {
    let mut config = common::test_config();
    config.limits = Limits {
        per_credential: budget(1, 3),
        per_team: budget(1000, 1000),
    };
    config.shared_limits = Some(windows().await);
    common::run_with(backend, config, instances_behind_the_api_share_the_budget).await;
}

#[tokio::test]
async fn sqlite_instances_behind_the_api_share_the_budget() {
    run_shared(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_instances_behind_the_api_share_the_budget() {
    run_shared(Backend::Postgres).await;
}
