//! Snapshots over the real worker channel (test workers over QUIC, control on SQLite and
//! PostgreSQL): the E2B and native routes, template-aware placement of sandboxes made from a
//! snapshot (they go to the worker holding it), deletion on the worker, audit entries, and bad
//! input.

mod common;

use axum::http::{Method, StatusCode};
use common::test_worker::{Profile, join, platform_admin};
use common::{Auth, TestApp};
use serde_json::{Value, json};

async fn native(app: &TestApp, key: &str, id: &str) -> Value {
    let r = app
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            Auth::Key(key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body
}

async fn audit_actions(app: &TestApp, user: &common::User) -> Vec<String> {
    let r = app
        .call(
            Method::GET,
            &format!("/v1/teams/{}/audit", user.team_id),
            Auth::Jwt(&user.token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect()
}

async fn snapshot_is_a_template_placed_on_its_worker(app: TestApp) {
    let admin = platform_admin(&app, "ops@example.com").await;
    let first = join(&app, &admin, Profile::new(8, &["base"])).await;
    let second = join(&app, &admin, Profile::new(8, &["base"])).await;
    let user = app.signup("dev@example.com").await;
    let key = app.api_key(&user).await;
    let source = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let holder = native(&app, &key, &source).await["hostId"]
        .as_str()
        .unwrap()
        .to_owned();
    let (holding, other) = if holder == first.creds.worker_id {
        (&first, &second)
    } else {
        (&second, &first)
    };

    // E2B: 201 SnapshotInfo; the sandbox keeps running; the worker holds the snapshot.
    let r = app
        .call(
            Method::POST,
            &format!("/sandboxes/{source}/snapshots"),
            Auth::Key(&key),
            Some(json!({"name": "my-snap"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let snap = r.body["snapshotID"].as_str().unwrap().to_owned();
    assert_eq!(r.body["names"], json!(["my-snap"]));
    assert_eq!(holding.book.snapshots(), vec![snap.clone()]);
    assert!(other.book.snapshots().is_empty());
    assert_eq!(native(&app, &key, &source).await["state"], "running");

    // Sandboxes from the snapshot (by id or by name) all land on the worker holding it,
    // though the other worker has more room.
    for template in [snap.as_str(), "my-snap"] {
        for _ in 0..3 {
            let id = app.e2b_sandbox(&key, json!({"templateID": template})).await;
            let s = native(&app, &key, &id).await;
            assert_eq!(s["hostId"], holder.as_str(), "{s}");
            assert_eq!(s["templateId"], snap.as_str());
            assert!(holding.book.holds(&id));
        }
    }

    // Native: a second, unnamed snapshot; both listed newest first, paged by cursor.
    let r = app
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{source}/snapshots"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let snap2 = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["kind"], "snapshot");
    assert_eq!(r.body["sourceSandboxId"], source.as_str());
    assert_eq!(r.body["sizeBytes"], 4096);
    let page = app
        .call(Method::GET, "/snapshots?limit=1", Auth::Key(&key), None)
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert_eq!(page.body, json!([{"snapshotID": snap2, "names": [snap2]}]));
    let next = page.header("x-next-token").unwrap().to_owned();
    let page = app
        .call(
            Method::GET,
            &format!("/snapshots?limit=1&nextToken={next}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(
        page.body,
        json!([{"snapshotID": snap, "names": ["my-snap"]}])
    );
    assert!(page.header("x-next-token").is_none());
    let listed = app
        .call(
            Method::GET,
            &format!("/v1/snapshots?sandboxId={source}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(listed.body["snapshots"].as_array().unwrap().len(), 2);
    assert!(listed.body["nextCursor"].is_null());

    // Deleting removes it from the catalog and from the worker; then 404.
    let r = app
        .call(
            Method::DELETE,
            &format!("/templates/{snap}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert!(!holding.book.snapshots().contains(&snap));
    app.call(
        Method::DELETE,
        &format!("/templates/{snap}"),
        Auth::Key(&key),
        None,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND);
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            Some(json!({"templateID": "my-snap"})),
        )
        .await;
    r.assert_error(StatusCode::NOT_FOUND);
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/templates/{snap2}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = app
        .call(Method::GET, "/snapshots", Auth::Key(&key), None)
        .await;
    assert_eq!(r.body, json!([]));

    let actions = audit_actions(&app, &user).await;
    for action in ["snapshot.create", "template.delete"] {
        assert_eq!(
            actions.iter().filter(|a| *a == action).count(),
            2,
            "{actions:?}"
        );
    }
}

async fn snapshot_bad_input_and_states(app: TestApp) {
    let admin = platform_admin(&app, "ops@example.com").await;
    let _worker = join(&app, &admin, Profile::new(8, &["base"])).await;
    let key = app.api_key(&app.signup("dev@example.com").await).await;
    let id = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let post = |path: String, body: Option<Value>| {
        let app = app.clone();
        let key = key.clone();
        async move { app.call(Method::POST, &path, Auth::Key(&key), body).await }
    };
    // Bad ids, unknown sandboxes, bad names, unknown fields where strict, malformed JSON.
    post("/sandboxes/not-an-id/snapshots".into(), None)
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    post("/sandboxes/cl-doesnotexist/snapshots".into(), None)
        .await
        .assert_error(StatusCode::NOT_FOUND);
    post(
        format!("/sandboxes/{id}/snapshots"),
        Some(json!({"name": "with space"})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
    post(
        format!("/sandboxes/{id}/snapshots"),
        Some(json!({"name": "%"})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
    post(
        format!("/v1/sandboxes/{id}/snapshots"),
        Some(json!({"nmae": "typo"})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
    let r = app
        .raw(
            Method::POST,
            &format!("/sandboxes/{id}/snapshots"),
            Auth::Key(&key),
            &[("content-type", "application/json")],
            axum::body::Body::from("{not json"),
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    for path in [
        "/snapshots?limit=0",
        "/snapshots?nextToken=zz",
        "/snapshots?sandboxID=bad%25id",
        "/v1/snapshots?cursor=zz",
        "/v1/snapshots?bogus=1",
    ] {
        app.call(Method::GET, path, Auth::Key(&key), None)
            .await
            .assert_error(StatusCode::BAD_REQUEST);
    }
    // Public templates cannot be deleted; overlong ids are refused before any lookup.
    app.call(Method::DELETE, "/templates/base", Auth::Key(&key), None)
        .await
        .assert_error(StatusCode::FORBIDDEN);
    let long = "x".repeat(200);
    app.call(
        Method::DELETE,
        &format!("/templates/{long}"),
        Auth::Key(&key),
        None,
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST);
    // Only running sandboxes can be snapshotted.
    let r = post(format!("/sandboxes/{id}/pause"), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    post(format!("/sandboxes/{id}/snapshots"), None)
        .await
        .assert_error(StatusCode::CONFLICT);
    let r = app
        .call(
            Method::DELETE,
            &format!("/sandboxes/{id}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    post(format!("/sandboxes/{id}/snapshots"), None)
        .await
        .assert_error(StatusCode::NOT_FOUND);
}

on_both_backends_with_channel!(
    snapshot_is_a_template_placed_on_its_worker,
    snapshot_bad_input_and_states,
);
