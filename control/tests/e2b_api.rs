//! The E2B-compatible routes, exactly as the SDKs use them, on SQLite and PostgreSQL.

mod common;

use axum::http::{Method, StatusCode};
use common::{Auth, TestApp};
use serde_json::json;

async fn create_returns_every_key_the_sdk_pops(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    for path in ["/sandboxes", "/v2/sandboxes"] {
        let r = app
            .call(Method::POST, path, Auth::Key(&key), Some(json!({
                "templateID": "base", "timeout": 60, "metadata": {"user": "alice"},
                "envVars": {"SECRET": "v"}, "secure": true, "mcp": null, "autoResume": {"enabled": false}
            })))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        for k in [
            "templateID",
            "sandboxID",
            "clientID",
            "envdVersion",
            "envdAccessToken",
            "domain",
        ] {
            assert!(r.body.get(k).is_some(), "{path}: missing {k} in {}", r.text);
        }
        let id = r.body["sandboxID"].as_str().unwrap();
        assert!(id.starts_with("cl-") && id[3..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(r.body["templateID"], "base");
        assert!(
            r.body["envdAccessToken"]
                .as_str()
                .is_some_and(|t| t.len() >= 32)
        );
    }
    // Env var values are never stored.
    let stored: Vec<(String,)> = sqlx::query_as("SELECT env_var_names FROM sandboxes")
        .fetch_all(app.db.pool())
        .await
        .unwrap();
    assert!(
        stored
            .iter()
            .all(|(names,)| names == "[\"SECRET\"]" && !names.contains("\"v\""))
    );
}

async fn info_pause_connect_timeout_metrics_kill(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    let id = app
        .e2b_sandbox(
            &key,
            json!({"templateID": "code-interpreter-v1", "metadata": {"k": "v"}}),
        )
        .await;
    let path = format!("/sandboxes/{id}");

    let r = app.call(Method::GET, &path, Auth::Key(&key), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for k in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "envdVersion",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
        "metadata",
    ] {
        assert!(r.body.get(k).is_some(), "missing {k} in {}", r.text);
    }
    assert_eq!(r.body["state"], "running");
    assert_eq!(r.body["metadata"]["k"], "v");
    assert_eq!(r.body["memoryMB"], 1024);

    let r = app
        .call(
            Method::GET,
            &format!("{path}/metrics"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let sample = &r.body[0];
    for k in [
        "timestamp",
        "timestampUnix",
        "cpuCount",
        "cpuUsedPct",
        "memUsed",
        "memTotal",
        "memCache",
        "diskUsed",
        "diskTotal",
    ] {
        assert!(sample.get(k).is_some(), "missing {k} in {}", r.text);
    }

    let r = app
        .call(
            Method::POST,
            &format!("{path}/timeout"),
            Auth::Key(&key),
            Some(json!({"timeout": 3600})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);

    let r = app
        .call(
            Method::POST,
            &format!("{path}/pause"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = app
        .call(
            Method::POST,
            &format!("{path}/pause"),
            Auth::Key(&key),
            None,
        )
        .await;
    r.assert_error(StatusCode::CONFLICT);
    assert_eq!(r.header("should-retry"), Some("false"));
    let r = app.call(Method::GET, &path, Auth::Key(&key), None).await;
    assert_eq!(r.body["state"], "paused");

    // Connect without a body resumes (201); again is already running (200).
    let r = app
        .call(
            Method::POST,
            &format!("/v2/sandboxes/{id}/connect"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["sandboxID"], id.as_str());
    let r = app
        .call(
            Method::POST,
            &format!("{path}/connect"),
            Auth::Key(&key),
            Some(json!({"timeout": 30})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .call(
            Method::POST,
            &format!("{path}/pause"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .call(
            Method::POST,
            &format!("{path}/resume"),
            Auth::Key(&key),
            Some(json!({"timeout": 30, "autoPause": false})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    let r = app.call(Method::DELETE, &path, Auth::Key(&key), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(app.worker.held(), 0, "the worker was told to kill it");
    app.call(Method::GET, &path, Auth::Key(&key), None)
        .await
        .assert_error(StatusCode::NOT_FOUND);
    app.call(Method::DELETE, &path, Auth::Key(&key), None)
        .await
        .assert_error(StatusCode::NOT_FOUND);
    app.call(
        Method::POST,
        &format!("{path}/pause"),
        Auth::Key(&key),
        None,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND);
}

async fn list_pages_with_next_token_and_filters(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.e2b_sandbox(
                &key,
                json!({"templateID": "base", "metadata": {"n": i.to_string(), "group": "g"}}),
            )
            .await,
        );
    }
    // A key and value full of SQL LIKE metacharacters, matched literally.
    let odd = app
        .e2b_sandbox(
            &key,
            json!({"templateID": "base", "metadata": {"a%_": "x%' OR '1'='1"}}),
        )
        .await;

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v2/sandboxes?limit=2&nextToken={t}"),
            None => "/v2/sandboxes?limit=2".to_owned(),
        };
        let r = app.call(Method::GET, &path, Auth::Key(&key), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let page = r.body.as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(
            page.iter()
                .map(|s| s["sandboxID"].as_str().unwrap().to_owned()),
        );
        match r.header("x-next-token") {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6);
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 6, "no sandbox appears on two pages");

    let r = app
        .call(
            Method::GET,
            "/v2/sandboxes?metadata=n%3D3%26group%3Dg",
            Auth::Key(&key),
            None,
        )
        .await;
    let listed: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![ids[3].as_str()]);

    let q = "/v2/sandboxes?metadata=a%2525_%3Dx%2525%27%2520OR%2520%271%27%3D%271";
    let r = app.call(Method::GET, q, Auth::Key(&key), None).await;
    let listed: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![odd.as_str()], "{}", r.text);
    for pattern in ["a%25%3D%25", "a%25_%3D%25", "%25%3D%25"] {
        let r = app
            .call(
                Method::GET,
                &format!("/v2/sandboxes?metadata={pattern}"),
                Auth::Key(&key),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.body,
            json!([]),
            "pattern {pattern} must not match as a wildcard"
        );
    }

    // State filter: pause one, then list paused only, and the old list shows running ones.
    let r = app
        .call(
            Method::POST,
            &format!("/sandboxes/{}/pause", ids[0]),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .call(
            Method::GET,
            "/v2/sandboxes?state=paused",
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert_eq!(r.body[0]["state"], "paused");
    let r = app
        .call(
            Method::GET,
            "/v2/sandboxes?state=running,paused",
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 6);
    let r = app
        .call(Method::GET, "/sandboxes", Auth::Key(&key), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 5);
    app.call(
        Method::GET,
        "/v2/sandboxes?state=killed",
        Auth::Key(&key),
        None,
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
    app.call(
        Method::GET,
        "/v2/sandboxes?nextToken=zz",
        Auth::Key(&key),
        None,
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
}

async fn idempotency_key_replays_and_guards(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    let body = json!({"templateID": "base", "metadata": {"a": "1"}});
    let h = [("idempotency-key", "req-1")];
    let first = app
        .call_with(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            &h,
            Some(body.clone()),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let again = app
        .call_with(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            &h,
            Some(body.clone()),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body["sandboxID"], first.body["sandboxID"]);
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sandboxes")
        .fetch_one(app.db.pool())
        .await
        .unwrap();
    assert_eq!(count, 1);

    let other = app
        .call_with(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            &h,
            Some(json!({"templateID": "base"})),
        )
        .await;
    other.assert_error(StatusCode::CONFLICT);
    assert_eq!(other.header("should-retry"), Some("false"));

    // Another team may use the same key independently.
    let other_user = app.signup("b@example.com").await;
    let other_key = app.api_key(&other_user).await;
    let r = app
        .call_with(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&other_key),
            &h,
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_ne!(r.body["sandboxID"], first.body["sandboxID"]);

    // A failed create releases its key, so the retry creates the sandbox.
    app.worker.refuse_next_creates(1);
    let h2 = [("idempotency-key", "req-2")];
    let failed = app
        .call_with(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            &h2,
            Some(body.clone()),
        )
        .await;
    failed.assert_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        failed.header("should-retry"),
        None,
        "capacity errors may be retried"
    );
    let retried = app
        .call_with(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            &h2,
            Some(body),
        )
        .await;
    assert_eq!(retried.status, StatusCode::CREATED, "{}", retried.text);
    let (killed,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sandboxes WHERE state = 'killed'")
        .fetch_one(app.db.pool())
        .await
        .unwrap();
    assert_eq!(
        killed, 1,
        "the sandbox whose placement failed is recorded as killed"
    );
}

async fn unknown_template_and_unauthenticated_calls(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            Some(json!({"templateID": "nope"})),
        )
        .await;
    r.assert_error(StatusCode::NOT_FOUND);
    app.call(Method::GET, "/v2/sandboxes", Auth::None, None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED);
    let fake = format!("e2b_{}", "0".repeat(40));
    app.call(Method::GET, "/v2/sandboxes", Auth::Key(&fake), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED);
    app.call(Method::GET, "/v2/sandboxes", Auth::Key("garbage"), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED);
    // An API key also works as a bearer token.
    let r = app
        .call(Method::GET, "/v2/sandboxes", Auth::Jwt(&key), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

on_both_backends!(
    create_returns_every_key_the_sdk_pops,
    info_pause_connect_timeout_metrics_kill,
    list_pages_with_next_token_and_filters,
    idempotency_key_replays_and_guards,
    unknown_template_and_unauthenticated_calls,
);
