//! The gateway's internal API: token auth, route lookups, the server-sent route-change stream
//! (one event for every state change that affects routing: create, pause, resume, kill,
//! timeout, lost host), auto-resume, and route changes published on Redis. Channel tests run
//! test workers over QUIC, on SQLite and PostgreSQL; Redis at `ROOST_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) with a random channel prefix per test.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::test_worker::{Profile, join, platform_admin};
use common::{Auth, Backend, INTERNAL_TOKEN, TestApp};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use roost_control::lifecycle::reaper;
use roost_control::route_events::RoutePublisher;
use roost_control::store::now_ms;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

const WAIT: Duration = Duration::from_secs(10);
const GATEWAY: Auth<'static> = Auth::Jwt(INTERNAL_TOKEN);

fn sha256(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A client of `GET /internal/v1/routes/events`.
struct Events {
    body: Body,
    buf: String,
    /// Events read but not yet expected (changes of different sandboxes may interleave).
    seen: Vec<Value>,
}

impl Events {
    async fn open(app: &TestApp) -> Self {
        let request = Request::get("/internal/v1/routes/events")
            .header("authorization", format!("Bearer {INTERNAL_TOKEN}"))
            .body(Body::empty())
            .unwrap();
        let response = app.router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            body: response.into_body(),
            buf: String::new(),
            seen: Vec::new(),
        }
    }

    /// The next event's JSON (keep-alive comments skipped).
    async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) {
                    return serde_json::from_str(data.trim()).unwrap();
                }
                continue;
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("no route event within the wait; saw {:?}", self.seen))
                .expect("event stream ended")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }

    /// Takes the first event (already read, or read now) that says `kind` about `sandbox`.
    async fn expect(&mut self, sandbox: &str, kind: &str) {
        let want = json!({"sandbox_id": sandbox, "kind": kind});
        loop {
            if let Some(i) = self.seen.iter().position(|e| *e == want) {
                self.seen.remove(i);
                return;
            }
            let event = self.next().await;
            self.seen.push(event);
        }
    }
}

async fn route(app: &TestApp, id: &str) -> common::Resp {
    app.call(
        Method::GET,
        &format!("/internal/v1/routes/{id}"),
        GATEWAY,
        None,
    )
    .await
}

async fn routes_follow_every_state_change(app: TestApp) {
    let admin = platform_admin(&app, "ops@example.com").await;
    let worker = join(&app, &admin, Profile::new(8, &["base"])).await;
    let user = app.signup("dev@example.com").await;
    let key = app.api_key(&user).await;
    let mut events = Events::open(&app).await;
    assert_eq!(events.next().await, json!({"kind": "resync"}));

    // Create (native: secure by default, here with private ports): changed.
    let r = app
        .call(
            Method::POST,
            "/v1/sandboxes",
            Auth::Key(&key),
            Some(json!({"template": "base", "allowPublicTraffic": false})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let envd = r.body["envdAccessToken"].as_str().unwrap().to_owned();
    let traffic = r.body["trafficAccessToken"].as_str().unwrap().to_owned();
    // Inserted (creating), then placed (running).
    events.expect(&id, "changed").await;
    events.expect(&id, "changed").await;
    let r = route(&app, &id).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body,
        json!({
            "sandbox_id": id,
            "team_id": user.team_id,
            "state": "running",
            "worker_id": worker.creds.worker_id,
            "envd_access_token_sha256": sha256(&envd),
            "public": false,
            "traffic_access_token_sha256": sha256(&traffic),
        })
    );
    assert!(!r.text.contains(&envd) && !r.text.contains(&traffic));
    // E2B create: public, no token; the E2B response carries no traffic token.
    let open = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    // Inserted (creating), then placed (running).
    events.expect(&open, "changed").await;
    events.expect(&open, "changed").await;
    let r = route(&app, &open).await;
    assert_eq!(r.body["public"], true);
    assert!(r.body["envd_access_token_sha256"].is_null());
    assert!(r.body["traffic_access_token_sha256"].is_null());

    // Pause: changed, route paused; auto-resume through the internal route: changed, running.
    let r = app
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/pause"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    events.expect(&id, "changed").await;
    assert_eq!(route(&app, &id).await.body["state"], "paused");
    let r = app
        .call(
            Method::POST,
            &format!("/internal/v1/sandboxes/{id}/resume"),
            GATEWAY,
            Some(json!({"timeout_secs": 60})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["state"], "running");
    assert_eq!(r.body["worker_id"], worker.creds.worker_id.as_str());
    events.expect(&id, "changed").await;
    // Resuming a running sandbox answers at once (no body needed).
    let r = app
        .call(
            Method::POST,
            &format!("/internal/v1/sandboxes/{id}/resume"),
            GATEWAY,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Timeout (the reaper, as the system): removed; the route is gone.
    let reaped = reaper::reap_once(&app.state.sandboxes, now_ms() + 3_600_000)
        .await
        .unwrap();
    assert_eq!(reaped.killed, 2, "{reaped:?}");
    events.expect(&id, "removed").await;
    events.expect(&open, "removed").await;
    route(&app, &id).await.assert_error(StatusCode::NOT_FOUND);
    app.call(
        Method::POST,
        &format!("/internal/v1/sandboxes/{id}/resume"),
        GATEWAY,
        None,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND);

    // Kill: removed.
    let killed = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    // Inserted (creating), then placed (running).
    events.expect(&killed, "changed").await;
    events.expect(&killed, "changed").await;
    let r = app
        .call(
            Method::DELETE,
            &format!("/sandboxes/{killed}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    events.expect(&killed, "removed").await;

    // A lost host: its sandbox changes to lost; it cannot be resumed (409).
    let lost = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    // Inserted (creating), then placed (running).
    events.expect(&lost, "changed").await;
    events.expect(&lost, "changed").await;
    worker.vanish();
    events.expect(&lost, "changed").await;
    let r = route(&app, &lost).await;
    assert_eq!(r.body["state"], "lost", "{}", r.text);
    app.call(
        Method::POST,
        &format!("/internal/v1/sandboxes/{lost}/resume"),
        GATEWAY,
        None,
    )
    .await
    .assert_error(StatusCode::CONFLICT);

    // Auto-resume is audited as the system.
    let r = app
        .call(
            Method::GET,
            &format!("/v1/teams/{}/audit?action=sandbox.resume", user.team_id),
            Auth::Jwt(&user.token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let entries = r.body["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "sandbox.resume" && e["actorKind"] == "system"),
        "{entries:?}"
    );
}

async fn internal_api_needs_the_token(app: TestApp) {
    let admin = platform_admin(&app, "ops@example.com").await;
    let _worker = join(&app, &admin, Profile::new(8, &["base"])).await;
    let key = app.api_key(&app.signup("dev@example.com").await).await;
    let id = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let path = format!("/internal/v1/routes/{id}");
    app.call(Method::GET, &path, Auth::None, None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED);
    app.call(
        Method::GET,
        &path,
        Auth::Jwt("wrong-token-of-some-length-0123456789"),
        None,
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED);
    app.call_with(
        Method::GET,
        &path,
        Auth::None,
        &[("authorization", &format!("Basic {INTERNAL_TOKEN}"))],
        None,
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED);
    assert_eq!(route(&app, &id).await.status, StatusCode::OK);
    route(&app, "not-a-sandbox")
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    route(&app, "cl-doesnotexist")
        .await
        .assert_error(StatusCode::NOT_FOUND);
    // Unknown fields in the resume body are refused; malformed JSON too.
    let resume = format!("/internal/v1/sandboxes/{id}/resume");
    app.call(
        Method::POST,
        &resume,
        GATEWAY,
        Some(json!({"timeoutSecs": 1})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
    app.raw(Method::POST, &resume, GATEWAY, &[], Body::from("{"))
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    app.call(
        Method::POST,
        &resume,
        GATEWAY,
        Some(json!({"timeout_secs": 0})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn internal_api_is_disabled_without_a_token() {
    let mut config = common::test_config();
    config.internal_token = None;
    common::run_with(Backend::Sqlite, config, |app| async move {
        for auth in [GATEWAY, Auth::None] {
            app.call(Method::GET, "/internal/v1/routes/events", auth, None)
                .await
                .assert_error(StatusCode::FORBIDDEN);
        }
    })
    .await;
}

fn redis_url() -> String {
    std::env::var("ROOST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn next(messages: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin)) -> Value {
    let msg = tokio::time::timeout(WAIT, messages.next())
        .await
        .expect("no message on Redis")
        .unwrap();
    serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap()
}

async fn route_changes_are_published_on_redis(app: TestApp) {
    let prefix = roost_control::store::random_id("roost-test-", 6).unwrap() + ":";
    let publisher = RoutePublisher::connect(&redis_url(), &prefix)
        .await
        .expect("Redis must be reachable (set ROOST_TEST_REDIS_URL)");
    assert_eq!(publisher.channel(), format!("{prefix}routes"));
    let client = redis::Client::open(redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(publisher.channel()).await.unwrap();
    let task = publisher.spawn(&app.db);
    let mut messages = pubsub.on_message();

    let key = app.api_key(&app.signup("dev@example.com").await).await;
    let id = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    // Inserted (creating), then placed (running).
    for _ in 0..2 {
        assert_eq!(
            next(&mut messages).await,
            json!({"sandbox_id": id, "kind": "changed"})
        );
    }
    let r = app
        .call(
            Method::DELETE,
            &format!("/sandboxes/{id}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        next(&mut messages).await,
        json!({"sandbox_id": id, "kind": "removed"})
    );
    task.abort();
}

mod redis_tests {
    use super::route_changes_are_published_on_redis;
    crate::on_both_backends!(route_changes_are_published_on_redis);
}

on_both_backends_with_channel!(
    routes_follow_every_state_change,
    internal_api_needs_the_token
);
