//! Native sandbox routes, the timeout reaper, the audit log, rate limits and the OpenAPI
//! document, on SQLite and PostgreSQL.

mod common;

use std::num::NonZeroU32;

use axum::http::{Method, StatusCode};
use common::{Auth, Backend, TestApp};
use roost_control::lifecycle::reaper;
use roost_control::ratelimit::{Budget, Limits};
use roost_control::store::now_ms;
use serde_json::json;

async fn native_sandbox_flow_and_cursor_pages(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let auth = Auth::Jwt(&user.token);
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = json!({"template": "base", "timeoutSecs": 120, "metadata": {"i": i.to_string()}, "envVars": {"TOKEN": "s"}});
        let r = app
            .call(Method::POST, "/v1/sandboxes", auth, Some(body))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["state"], "running");
        assert_eq!(r.body["envVarNames"], json!(["TOKEN"]));
        ids.push(r.body["id"].as_str().unwrap().to_owned());
    }
    let first = app
        .call(Method::GET, "/v1/sandboxes?limit=2", auth, None)
        .await;
    assert_eq!(first.body["sandboxes"].as_array().unwrap().len(), 2);
    let cursor = first.body["nextCursor"].as_str().unwrap();
    let second = app
        .call(
            Method::GET,
            &format!("/v1/sandboxes?limit=2&cursor={cursor}"),
            auth,
            None,
        )
        .await;
    assert_eq!(second.body["sandboxes"].as_array().unwrap().len(), 1);
    assert!(second.body["nextCursor"].is_null());
    // Newest first.
    assert_eq!(second.body["sandboxes"][0]["id"], ids[0].as_str());

    let id = &ids[1];
    let r = app
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/pause"),
            auth,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/metrics"),
            auth,
            None,
        )
        .await;
    assert_eq!(r.body, json!([]), "a paused sandbox has no samples");
    let r = app
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/timeout"),
            auth,
            Some(json!({"timeoutSecs": 5})),
        )
        .await;
    r.assert_error(StatusCode::CONFLICT);
    let r = app
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            auth,
            Some(json!({"timeoutSecs": 60})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app
        .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), auth, None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .call(Method::GET, &format!("/v1/sandboxes/{id}"), auth, None)
        .await;
    assert_eq!(r.body["state"], "killed", "native GET keeps history");
    assert!(r.body["endedAt"].is_string());
    let r = app
        .call(Method::GET, "/v1/sandboxes?state=killed", auth, None)
        .await;
    assert_eq!(r.body["sandboxes"].as_array().unwrap().len(), 1);
}

async fn reaper_kills_or_pauses_expired_sandboxes(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    let killed = app
        .e2b_sandbox(&key, json!({"templateID": "base", "timeout": 1}))
        .await;
    let paused = app
        .e2b_sandbox(
            &key,
            json!({"templateID": "base", "timeout": 1, "autoPause": true}),
        )
        .await;
    let alive = app
        .e2b_sandbox(&key, json!({"templateID": "base", "timeout": 3600}))
        .await;

    let report = reaper::reap_once(&app.state.sandboxes, now_ms())
        .await
        .unwrap();
    assert_eq!(
        (report.killed, report.paused),
        (0, 0),
        "nothing has expired yet"
    );
    let report = reaper::reap_once(&app.state.sandboxes, now_ms() + 2_000)
        .await
        .unwrap();
    assert_eq!((report.killed, report.paused), (1, 1));

    let auth = Auth::Key(&key);
    app.call(Method::GET, &format!("/sandboxes/{killed}"), auth, None)
        .await
        .assert_error(StatusCode::NOT_FOUND);
    let r = app
        .call(Method::GET, &format!("/sandboxes/{paused}"), auth, None)
        .await;
    assert_eq!(r.body["state"], "paused");
    let r = app
        .call(Method::GET, &format!("/sandboxes/{alive}"), auth, None)
        .await;
    assert_eq!(r.body["state"], "running");
    assert_eq!(
        app.worker.held(),
        2,
        "the worker killed one and holds the paused one"
    );
    // A second pass finds nothing more.
    let report = reaper::reap_once(&app.state.sandboxes, now_ms() + 2_000)
        .await
        .unwrap();
    assert_eq!((report.killed, report.paused), (0, 0));

    // The system actor shows in the audit log.
    let r = app
        .call(
            Method::GET,
            &format!(
                "/v1/teams/{}/audit?action=sandbox.timeout_kill",
                user.team_id
            ),
            Auth::Jwt(&user.token),
            None,
        )
        .await;
    let entries = r.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{}", r.text);
    assert_eq!(entries[0]["actorKind"], "system");
    assert_eq!(entries[0]["targetId"], killed.as_str());
}

async fn audit_log_pages_newest_first(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    for _ in 0..3 {
        app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    }
    let base = format!("/v1/teams/{}/audit", user.team_id);
    let auth = Auth::Jwt(&user.token);
    let mut ids = Vec::new();
    let mut path = format!("{base}?limit=2");
    loop {
        let r = app.call(Method::GET, &path, auth, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for e in r.body["entries"].as_array().unwrap() {
            ids.push(e["id"].as_i64().unwrap());
        }
        match r.body["nextCursor"].as_str() {
            Some(c) => path = format!("{base}?limit=2&cursor={c}"),
            None => break,
        }
    }
    // signup, key creation, three creates.
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let r = app
        .call(
            Method::GET,
            &format!("{base}?action=sandbox.create"),
            auth,
            None,
        )
        .await;
    let entries = r.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().all(|e| e["actorKind"] == "api_key"));
}

async fn rate_limit_answers_429_with_retry_after(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = app
            .call(Method::GET, "/v2/sandboxes", Auth::Key(&key), None)
            .await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            r.assert_error(StatusCode::TOO_MANY_REQUESTS);
            let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=60).contains(&wait));
            assert_eq!(r.header("should-retry"), None, "429 may be retried");
        }
        statuses.push(r.status);
    }
    assert!(statuses.contains(&StatusCode::OK));
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
}

async fn openapi_document_lists_the_routes(app: TestApp) {
    let r = app
        .call(Method::GET, "/openapi.json", Auth::None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let paths = r.body["paths"].as_object().unwrap();
    for p in [
        "/v2/sandboxes",
        "/sandboxes",
        "/sandboxes/{sandboxID}",
        "/sandboxes/{sandboxID}/pause",
        "/v2/sandboxes/{sandboxID}/connect",
        "/v1/sandboxes/{id}",
        "/v1/teams/{team_id}/api-keys",
        "/v1/auth/signup",
        "/health",
        "/sandboxes/{sandboxID}/snapshots",
        "/snapshots",
        "/templates/{templateID}",
        "/v1/sandboxes/{id}/snapshots",
        "/v1/snapshots",
        "/v1/templates/{template_id}",
        "/v1/admin/hosts/{host_id}/drain",
        "/v1/admin/hosts/{host_id}/undrain",
        "/internal/v1/routes/{sandbox_id}",
        "/internal/v1/routes/events",
        "/internal/v1/sandboxes/{sandbox_id}/resume",
    ] {
        assert!(paths.contains_key(p), "missing {p}");
    }
    assert!(paths["/v1/templates/{template_id}"]["delete"].is_object());
    // /health is served by the same router and answers while the database does.
    let health = app.call(Method::GET, "/health", Auth::None, None).await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);
    assert_eq!(health.body, json!({"status": "ok"}));
    assert!(r.body["components"]["securitySchemes"]["api_key"].is_object());
}

fn tight_limits() -> roost_control::api::Config {
    let mut config = common::test_config();
    let n = |v| NonZeroU32::new(v).unwrap();
    // The signup and key creation use the user's budget; the API key has its own.
    config.limits = Limits {
        per_credential: Budget {
            per_second: n(1),
            burst: n(3),
        },
        per_team: Budget {
            per_second: n(1),
            burst: n(100),
        },
    };
    config
}

#[tokio::test]
async fn sqlite_rate_limit() {
    common::run_with(
        Backend::Sqlite,
        tight_limits(),
        rate_limit_answers_429_with_retry_after,
    )
    .await;
}

#[tokio::test]
async fn postgres_rate_limit() {
    common::run_with(
        Backend::Postgres,
        tight_limits(),
        rate_limit_answers_429_with_retry_after,
    )
    .await;
}

on_both_backends!(
    native_sandbox_flow_and_cursor_pages,
    reaper_kills_or_pauses_expired_sandboxes,
    audit_log_pages_newest_first,
    openapi_document_lists_the_routes,
);
