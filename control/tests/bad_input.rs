//! Bad input answers a clear 4xx in the `{code, message}` contract, never a 500 or plain text.

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::{Auth, TestApp};
use serde_json::json;

async fn malformed_bodies_ids_and_queries(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    let auth = Auth::Key(&key);
    let json_ct = [("content-type", "application/json")];

    let r = app
        .raw(
            Method::POST,
            "/v2/sandboxes",
            auth,
            &json_ct,
            Body::from("{\"templateID\": "),
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    let r = app
        .raw(
            Method::POST,
            "/v2/sandboxes",
            auth,
            &[("content-type", "text/plain")],
            Body::from("{}"),
        )
        .await;
    r.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            auth,
            Some(json!({"timeout": 5})),
        )
        .await;
    r.assert_error(StatusCode::UNPROCESSABLE_ENTITY);
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            auth,
            Some(json!({"templateID": "base", "metadata": {"n": 1}})),
        )
        .await;
    r.assert_error(StatusCode::UNPROCESSABLE_ENTITY);
    // Native routes are strict about unknown fields.
    let r = app
        .call(
            Method::POST,
            "/v1/sandboxes",
            auth,
            Some(json!({"template": "base", "tempalteTypo": 1})),
        )
        .await;
    r.assert_error(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text.contains("tempalteTypo"), "{}", r.text);
    // Huge bodies are refused before parsing.
    let huge = format!(
        "{{\"templateID\":\"base\",\"metadata\":{{\"k\":\"{}\"}}}}",
        "x".repeat(200 * 1024)
    );
    let r = app
        .raw(
            Method::POST,
            "/v2/sandboxes",
            auth,
            &json_ct,
            Body::from(huge),
        )
        .await;
    r.assert_error(StatusCode::PAYLOAD_TOO_LARGE);
    // Semantic limits.
    for body in [
        json!({"templateID": "base", "timeout": 0}),
        json!({"templateID": "base", "timeout": 100_000_000}),
        json!({"templateID": "base", "envVars": {"1BAD": "x"}}),
        json!({"templateID": "base", "envVars": {"A=B": "x"}}),
        json!({"templateID": "base", "metadata": {"": "x"}}),
        json!({"templateID": ""}),
    ] {
        app.call(Method::POST, "/v2/sandboxes", auth, Some(body))
            .await
            .assert_error(StatusCode::BAD_REQUEST);
    }
    let long_key = "k".repeat(300);
    app.call_with(
        Method::POST,
        "/v2/sandboxes",
        auth,
        &[("idempotency-key", &long_key)],
        Some(json!({"templateID": "base"})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
    // Ids that are not sandbox ids, including injection attempts.
    for bad in [
        "nope",
        "cl-",
        "CL-ABC",
        "cl-abc%27%20OR%20%271%27%3D%271",
        "cl-a_b",
        "cl-%25",
    ] {
        for path in [format!("/sandboxes/{bad}"), format!("/v1/sandboxes/{bad}")] {
            app.call(Method::GET, &path, auth, None)
                .await
                .assert_error(StatusCode::BAD_REQUEST);
        }
    }
    // A well-formed id that does not exist.
    app.call(Method::GET, "/sandboxes/cl-doesnotexist", auth, None)
        .await
        .assert_error(StatusCode::NOT_FOUND);
    // Query strings.
    for q in [
        "limit=0",
        "limit=1000",
        "limit=abc",
        "nextToken=%%%",
        "state=sleeping",
        "metadata=%3Dv",
    ] {
        app.call(Method::GET, &format!("/v2/sandboxes?{q}"), auth, None)
            .await
            .assert_error(StatusCode::BAD_REQUEST);
    }
    app.call(Method::GET, "/v1/sandboxes?bogus=1", auth, None)
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    app.call(
        Method::GET,
        &format!("/v1/teams/{}/audit?cursor=xyz", user.team_id),
        Auth::Jwt(&user.token),
        None,
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
    // Unknown routes and methods.
    app.call(Method::GET, "/v3/nothing", auth, None)
        .await
        .assert_error(StatusCode::NOT_FOUND);
    app.call(Method::PUT, "/v2/sandboxes", auth, None)
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED);
    // Signup validation.
    for body in [
        json!({"email": "no-at-sign", "password": "password123"}),
        json!({"email": "a@b.c", "password": "short"}),
    ] {
        app.call(Method::POST, "/v1/auth/signup", Auth::None, Some(body))
            .await
            .assert_error(StatusCode::BAD_REQUEST);
    }
    app.call(
        Method::POST,
        "/v1/auth/signup",
        Auth::None,
        Some(json!({"email": "a@b.c", "password": "password123", "admin": true})),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY);
    // Nothing above created a sandbox.
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sandboxes")
        .fetch_one(app.db.pool())
        .await
        .unwrap();
    assert_eq!(count, 0);
}

async fn bad_egress_lists_are_refused_naming_the_entry(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let key = app.api_key(&user).await;
    let auth = Auth::Key(&key);

    // E2B: a bad entry in either list is a 400 naming the list and the entry.
    for (network, list, entry) in [
        (
            json!({"allowOut": ["not a host!"]}),
            "allowOut",
            "not a host!",
        ),
        (
            json!({"allowOut": ["10.0.0.0/8"], "denyOut": ["2001:db8::/32"]}),
            "denyOut",
            "2001:db8::/32",
        ),
        (json!({"denyOut": ["1.2.3.4/33"]}), "denyOut", "1.2.3.4/33"),
    ] {
        for path in ["/v2/sandboxes", "/sandboxes"] {
            let r = app
                .call(
                    Method::POST,
                    path,
                    auth,
                    Some(json!({"templateID": "base", "network": network})),
                )
                .await;
            r.assert_error(StatusCode::BAD_REQUEST);
            assert_eq!(r.header("should-retry"), Some("false"));
            let message = r.body["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("{list}: "))
                    && message.contains(&format!("`{entry}`")),
                "{path}: {message}"
            );
        }
    }
    // Too many entries.
    let many = vec!["1.1.1.1"; roost_proto::egress::MAX_ENTRIES + 1];
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            auth,
            Some(json!({"templateID": "base", "network": {"denyOut": many}})),
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .starts_with("denyOut has 1001 entries"),
        "{}",
        r.text
    );
    // Not a list of strings: the JSON shape is wrong (422, like other mistyped fields).
    app.call(
        Method::POST,
        "/v2/sandboxes",
        auth,
        Some(json!({"templateID": "base", "network": {"allowOut": "10.0.0.0/8"}})),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY);
    // The native route checks the same lists.
    let r = app
        .call(
            Method::POST,
            "/v1/sandboxes",
            auth,
            Some(json!({"template": "base", "allowOut": ["ok.example", "not a host!"]})),
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    assert!(r.text.contains("`not a host!`"), "{}", r.text);
    // Refused before anything was stored or placed.
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sandboxes")
        .fetch_one(app.db.pool())
        .await
        .unwrap();
    assert_eq!(count, 0);
    assert_eq!(app.worker.held(), 0);
}

on_both_backends!(
    malformed_bodies_ids_and_queries,
    bad_egress_lists_are_refused_naming_the_entry,
);
