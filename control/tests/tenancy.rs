//! Tenant isolation and roles: team B's credentials against team A's resources on every
//! route must answer 404/403 and leak nothing; roles are read from the database.

mod common;

use axum::http::{Method, StatusCode};
use common::{Auth, TestApp};
use serde_json::json;

async fn cross_tenant_matrix(app: TestApp) {
    let a = app.signup("a@example.com").await;
    let a_key = app.api_key(&a).await;
    let id = app
        .e2b_sandbox(
            &a_key,
            json!({"templateID": "base", "metadata": {"owner": "a"}}),
        )
        .await;
    let keys = app
        .call(
            Method::GET,
            &format!("/v1/teams/{}/api-keys", a.team_id),
            Auth::Jwt(&a.token),
            None,
        )
        .await;
    let a_key_id = keys.body[0]["id"].as_str().unwrap().to_owned();
    // A snapshot of A's sandbox, named, for the template and snapshot routes.
    let snap = app
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/snapshots"),
            Auth::Key(&a_key),
            Some(json!({"name": "a-private-snap"})),
        )
        .await;
    assert_eq!(snap.status, StatusCode::CREATED, "{}", snap.text);
    let snap_id = snap.body["snapshotID"].as_str().unwrap().to_owned();

    let b = app.signup("b@example.com").await;
    let b_key = app.api_key(&b).await;
    let timeout = Some(json!({"timeout": 10}));
    let native_timeout = Some(json!({"timeoutSecs": 10}));
    let sandbox_routes = [
        (Method::GET, format!("/sandboxes/{id}"), None),
        (Method::DELETE, format!("/sandboxes/{id}"), None),
        (
            Method::POST,
            format!("/sandboxes/{id}/timeout"),
            timeout.clone(),
        ),
        (Method::POST, format!("/sandboxes/{id}/pause"), None),
        (
            Method::POST,
            format!("/sandboxes/{id}/resume"),
            timeout.clone(),
        ),
        (
            Method::POST,
            format!("/sandboxes/{id}/connect"),
            timeout.clone(),
        ),
        (
            Method::POST,
            format!("/v2/sandboxes/{id}/connect"),
            timeout.clone(),
        ),
        (Method::GET, format!("/sandboxes/{id}/metrics"), None),
        (Method::GET, format!("/v1/sandboxes/{id}"), None),
        (Method::DELETE, format!("/v1/sandboxes/{id}"), None),
        (Method::POST, format!("/v1/sandboxes/{id}/pause"), None),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/resume"),
            native_timeout.clone(),
        ),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/timeout"),
            native_timeout.clone(),
        ),
        (Method::GET, format!("/v1/sandboxes/{id}/metrics"), None),
        (Method::POST, format!("/sandboxes/{id}/snapshots"), None),
        (Method::POST, format!("/v1/sandboxes/{id}/snapshots"), None),
        (Method::DELETE, format!("/templates/{snap_id}"), None),
        (Method::DELETE, format!("/v1/templates/{snap_id}"), None),
        (Method::DELETE, "/templates/a-private-snap".to_owned(), None),
        (Method::GET, format!("/v1/templates/{snap_id}"), None),
        (Method::GET, "/v1/templates/a-private-snap".to_owned(), None),
        (
            Method::POST,
            "/v2/sandboxes".to_owned(),
            Some(json!({"templateID": snap_id})),
        ),
        (
            Method::POST,
            "/v1/sandboxes".to_owned(),
            Some(json!({"template": "a-private-snap"})),
        ),
    ];
    for auth in [Auth::Key(&b_key), Auth::Jwt(&b.token)] {
        for (method, path, body) in &sandbox_routes {
            let r = app.call(method.clone(), path, auth, body.clone()).await;
            r.assert_error(StatusCode::NOT_FOUND);
            assert!(
                !r.text.contains("owner") && !r.text.contains(&a.team_id),
                "{method} {path} leaked: {}",
                r.text
            );
        }
        for path in [
            "/sandboxes",
            "/v2/sandboxes",
            "/v2/sandboxes?metadata=owner%3Da",
            "/v1/sandboxes",
            "/v1/templates",
            "/snapshots",
            "/v1/snapshots",
        ] {
            let r = app.call(Method::GET, path, auth, None).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
            assert!(
                !r.text.contains(&id)
                    && !r.text.contains(&a.team_id)
                    && !r.text.contains(&snap_id)
                    && !r.text.contains("a-private-snap"),
                "{path} leaked: {}",
                r.text
            );
        }
        // Filtering B's snapshots by A's sandbox finds nothing.
        for path in [
            format!("/snapshots?sandboxID={id}"),
            format!("/v1/snapshots?sandboxId={id}"),
        ] {
            let r = app.call(Method::GET, &path, auth, None).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
            assert!(!r.text.contains(&snap_id), "{path} leaked: {}", r.text);
        }
        // Tenant credentials are no internal token: the gateway routes are closed to them.
        for (method, path) in [
            (Method::GET, format!("/internal/v1/routes/{id}")),
            (Method::GET, "/internal/v1/routes/events".to_owned()),
            (Method::POST, format!("/internal/v1/sandboxes/{id}/resume")),
        ] {
            let r = app.call(method.clone(), &path, auth, None).await;
            r.assert_error(StatusCode::UNAUTHORIZED);
            assert!(!r.text.contains(&a.team_id), "{path} leaked: {}", r.text);
        }
        // Host administration is for platform admins only.
        for path in [
            "/v1/admin/hosts/host-instant/drain",
            "/v1/admin/hosts/host-instant/undrain",
        ] {
            let r = app.call(Method::POST, path, auth, None).await;
            r.assert_error(StatusCode::FORBIDDEN);
        }
    }
    // Team-administration routes for team A, by user B: the team does not exist for them.
    let team_routes = [
        (
            Method::GET,
            format!("/v1/teams/{}/members", a.team_id),
            None,
        ),
        (
            Method::POST,
            format!("/v1/teams/{}/members", a.team_id),
            Some(json!({"email": "b@example.com", "role": "owner"})),
        ),
        (
            Method::PATCH,
            format!("/v1/teams/{}/members/{}", a.team_id, a.id),
            Some(json!({"role": "member"})),
        ),
        (
            Method::DELETE,
            format!("/v1/teams/{}/members/{}", a.team_id, a.id),
            None,
        ),
        (
            Method::GET,
            format!("/v1/teams/{}/api-keys", a.team_id),
            None,
        ),
        (
            Method::POST,
            format!("/v1/teams/{}/api-keys", a.team_id),
            Some(json!({"name": "x"})),
        ),
        (
            Method::DELETE,
            format!("/v1/teams/{}/api-keys/{a_key_id}", a.team_id),
            None,
        ),
        (Method::GET, format!("/v1/teams/{}/audit", a.team_id), None),
    ];
    for (method, path, body) in &team_routes {
        let r = app
            .call(method.clone(), path, Auth::Jwt(&b.token), body.clone())
            .await;
        r.assert_error(StatusCode::NOT_FOUND);
        assert!(
            !r.text.contains("a@example.com"),
            "{path} leaked: {}",
            r.text
        );
        // API keys never administer teams, not even their own.
        let r = app
            .call(method.clone(), path, Auth::Key(&a_key), body.clone())
            .await;
        r.assert_error(StatusCode::FORBIDDEN);
    }
    // B's key revocation path with A's key id under B's team: not found.
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/teams/{}/api-keys/{a_key_id}", b.team_id),
            Auth::Jwt(&b.token),
            None,
        )
        .await;
    r.assert_error(StatusCode::NOT_FOUND);
    // Choosing A's team explicitly is refused.
    let h = [("x-team-id", a.team_id.as_str())];
    app.call_with(Method::GET, "/v1/sandboxes", Auth::Jwt(&b.token), &h, None)
        .await
        .assert_error(StatusCode::FORBIDDEN);
    app.call_with(Method::GET, "/v1/sandboxes", Auth::Key(&b_key), &h, None)
        .await
        .assert_error(StatusCode::FORBIDDEN);
    let teams = app
        .call(Method::GET, "/v1/teams", Auth::Jwt(&b.token), None)
        .await;
    assert!(!teams.text.contains(&a.team_id));

    // After all that, A's sandbox and key are untouched.
    let r = app
        .call(
            Method::GET,
            &format!("/sandboxes/{id}"),
            Auth::Key(&a_key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["state"], "running");
    let r = app
        .call(Method::GET, "/snapshots", Auth::Key(&a_key), None)
        .await;
    assert_eq!(
        r.body,
        json!([{"snapshotID": snap_id, "names": ["a-private-snap"]}])
    );
    assert!(app.worker.holds_snapshot(&snap_id));
}

async fn roles_are_enforced_from_the_database(app: TestApp) {
    let owner = app.signup("owner@example.com").await;
    let admin = app.signup("admin@example.com").await;
    let member = app.signup("member@example.com").await;
    let team = owner.team_id.clone();
    let members = format!("/v1/teams/{team}/members");
    for (email, role) in [
        ("admin@example.com", "admin"),
        ("member@example.com", "member"),
    ] {
        let r = app
            .call(
                Method::POST,
                &members,
                Auth::Jwt(&owner.token),
                Some(json!({"email": email, "role": role})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let dup = app
        .call(
            Method::POST,
            &members,
            Auth::Jwt(&owner.token),
            Some(json!({"email": "admin@example.com", "role": "member"})),
        )
        .await;
    dup.assert_error(StatusCode::CONFLICT);
    // A member cannot add people; an admin cannot make owners or touch the owner.
    let _outsider = app.signup("x@example.com").await;
    app.call(
        Method::POST,
        &members,
        Auth::Jwt(&member.token),
        Some(json!({"email": "x@example.com", "role": "member"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN);
    app.call(
        Method::POST,
        &members,
        Auth::Jwt(&admin.token),
        Some(json!({"email": "x@example.com", "role": "owner"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN);
    app.call(
        Method::PATCH,
        &format!("{members}/{}", owner.id),
        Auth::Jwt(&admin.token),
        Some(json!({"role": "member"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN);
    // The last owner cannot step down or leave.
    app.call(
        Method::PATCH,
        &format!("{members}/{}", owner.id),
        Auth::Jwt(&owner.token),
        Some(json!({"role": "admin"})),
    )
    .await
    .assert_error(StatusCode::CONFLICT);
    app.call(
        Method::DELETE,
        &format!("{members}/{}", owner.id),
        Auth::Jwt(&owner.token),
        None,
    )
    .await
    .assert_error(StatusCode::CONFLICT);
    // Audit is for admins: the member is refused, then the admin is demoted and refused at
    // once with the same (unchanged) session token.
    let audit = format!("/v1/teams/{team}/audit");
    app.call(Method::GET, &audit, Auth::Jwt(&member.token), None)
        .await
        .assert_error(StatusCode::FORBIDDEN);
    assert_eq!(
        app.call(Method::GET, &audit, Auth::Jwt(&admin.token), None)
            .await
            .status,
        StatusCode::OK
    );
    let r = app
        .call(
            Method::PATCH,
            &format!("{members}/{}", admin.id),
            Auth::Jwt(&owner.token),
            Some(json!({"role": "member"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    app.call(Method::GET, &audit, Auth::Jwt(&admin.token), None)
        .await
        .assert_error(StatusCode::FORBIDDEN);
    // A member works in the team's sandboxes via X-Team-Id.
    let h = [("x-team-id", team.as_str())];
    let r = app
        .call_with(
            Method::POST,
            "/v1/sandboxes",
            Auth::Jwt(&member.token),
            &h,
            Some(json!({"template": "base"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let listed = app
        .call_with(
            Method::GET,
            "/v1/sandboxes",
            Auth::Jwt(&owner.token),
            &h,
            None,
        )
        .await;
    assert_eq!(listed.body["sandboxes"].as_array().unwrap().len(), 1);
    // Removed members lose access immediately.
    let r = app
        .call(
            Method::DELETE,
            &format!("{members}/{}", member.id),
            Auth::Jwt(&admin.token),
            None,
        )
        .await;
    r.assert_error(StatusCode::FORBIDDEN);
    let r = app
        .call(
            Method::DELETE,
            &format!("{members}/{}", member.id),
            Auth::Jwt(&owner.token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    app.call_with(
        Method::GET,
        "/v1/sandboxes",
        Auth::Jwt(&member.token),
        &h,
        None,
    )
    .await
    .assert_error(StatusCode::FORBIDDEN);
}

async fn api_keys_are_shown_once_stored_hashed_and_revocable(app: TestApp) {
    let user = app.signup("a@example.com").await;
    let path = format!("/v1/teams/{}/api-keys", user.team_id);
    let created = app
        .call(
            Method::POST,
            &path,
            Auth::Jwt(&user.token),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let secret = created.body["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("e2b_") && secret.len() == 44);
    assert!(secret.starts_with(created.body["prefix"].as_str().unwrap()));
    let list = app
        .call(Method::GET, &path, Auth::Jwt(&user.token), None)
        .await;
    assert!(
        !list.text.contains(&secret[10..]),
        "listing must not show the secret"
    );
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT prefix, secret_sha256 FROM api_keys")
            .fetch_all(app.db.pool())
            .await
            .unwrap();
    assert!(
        stored
            .iter()
            .all(|(p, h)| !h.contains(&secret[4..]) && p.len() < 12 && h.len() == 64)
    );

    assert_eq!(
        app.call(Method::GET, "/v2/sandboxes", Auth::Key(&secret), None)
            .await
            .status,
        StatusCode::OK
    );
    let key_id = created.body["id"].as_str().unwrap();
    let r = app
        .call(
            Method::DELETE,
            &format!("{path}/{key_id}"),
            Auth::Jwt(&user.token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    app.call(Method::GET, "/v2/sandboxes", Auth::Key(&secret), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED);
    app.call(
        Method::DELETE,
        &format!("{path}/{key_id}"),
        Auth::Jwt(&user.token),
        None,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND);
}

async fn signup_and_login(app: TestApp) {
    app.signup("Someone@Example.com").await;
    let again = app
        .call(
            Method::POST,
            "/v1/auth/signup",
            Auth::None,
            Some(json!({"email": "someone@example.com", "password": "password123"})),
        )
        .await;
    again.assert_error(StatusCode::CONFLICT);
    let ok = app
        .call(
            Method::POST,
            "/v1/auth/login",
            Auth::None,
            Some(json!({"email": "someone@example.com", "password": "password123"})),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    let token = ok.body["token"].as_str().unwrap();
    assert_eq!(
        app.call(Method::GET, "/v1/teams", Auth::Jwt(token), None)
            .await
            .status,
        StatusCode::OK
    );
    let bad = app
        .call(
            Method::POST,
            "/v1/auth/login",
            Auth::None,
            Some(json!({"email": "someone@example.com", "password": "wrong-password"})),
        )
        .await;
    bad.assert_error(StatusCode::UNAUTHORIZED);
    let nobody = app
        .call(
            Method::POST,
            "/v1/auth/login",
            Auth::None,
            Some(json!({"email": "nobody@example.com", "password": "password123"})),
        )
        .await;
    nobody.assert_error(StatusCode::UNAUTHORIZED);
    assert_eq!(
        bad.body, nobody.body,
        "unknown emails and wrong passwords look alike"
    );
    app.call(Method::GET, "/v1/teams", Auth::Jwt("not.a.jwt"), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED);
    let stored: (String,) = sqlx::query_as("SELECT password_hash FROM users")
        .fetch_one(app.db.pool())
        .await
        .unwrap();
    assert!(stored.0.starts_with("$argon2id$"));
}

on_both_backends!(
    cross_tenant_matrix,
    roles_are_enforced_from_the_database,
    api_keys_are_shown_once_stored_hashed_and_revocable,
    signup_and_login,
);
