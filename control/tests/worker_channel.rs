//! The worker channel end to end: registration tokens, mutual TLS, placement over QUIC,
//! heartbeats, lost hosts and reconciliation, with in-process test workers on 127.0.0.1 and
//! control on SQLite and PostgreSQL. Heartbeats every 100 ms, lost after 1.5 s; waits are
//! bounded at 10 s and only test that the mechanism acts, never how fast.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::test_worker::{self, Creds, Profile, Sent, TestWorker};
use common::{Auth, TestApp, User, eventually};
use roost_control::pki::ControlCa;
use roost_control::store::{hosts, now_ms, users, worker_tokens};
use roost_control::workers::WorkerChannel;
use roost_control::workers::client::ClientError;
use roost_proto::control::WorkerSandboxState;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn platform_admin(app: &TestApp) -> User {
    let admin = app.signup("ops@example.com").await;
    assert!(
        users::set_platform_admin(&app.db, &admin.id, true)
            .await
            .unwrap()
    );
    admin
}

async fn token(app: &TestApp, admin: &User) -> String {
    let r = app
        .call(
            Method::POST,
            "/v1/admin/workers/registration-tokens",
            Auth::Jwt(&admin.token),
            Some(json!({"name": "rack-1", "ttlSecs": 600})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["token"].as_str().unwrap().to_owned()
}

/// Registers and connects a worker with `profile`.
async fn worker(app: &TestApp, admin: &User, profile: Profile) -> TestWorker {
    let creds = test_worker::register(app, &token(app, admin).await)
        .await
        .unwrap_or_else(|r| panic!("registration failed: {}", r.text));
    TestWorker::connect(&creds, profile, Arc::default())
        .await
        .unwrap()
}

/// A user with an API key, for the E2B routes.
async fn tenant(app: &TestApp, email: &str) -> String {
    let user = app.signup(email).await;
    app.api_key(&user).await
}

async fn sandbox(app: &TestApp, key: &str, id: &str) -> Value {
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

async fn wait_for_state(app: &TestApp, key: &str, id: &str, state: &str) -> Value {
    eventually(&format!("sandbox {id} to be {state}"), WAIT, || async {
        let body = sandbox(app, key, id).await;
        (body["state"] == state).then_some(body)
    })
    .await
}

async fn registration_tokens_are_single_use_and_expire(app: TestApp) {
    let admin = platform_admin(&app).await;
    let plain = app.signup("dev@example.com").await;
    let r = app
        .call(
            Method::POST,
            "/v1/admin/workers/registration-tokens",
            Auth::Jwt(&plain.token),
            Some(json!({"name": "x"})),
        )
        .await;
    r.assert_error(StatusCode::FORBIDDEN);
    let r = app
        .call(
            Method::POST,
            "/v1/admin/workers/registration-tokens",
            Auth::Jwt(&admin.token),
            Some(json!({"name": "x", "ttlSecs": 0})),
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);

    let secret = token(&app, &admin).await;
    // A bad CSR is refused without spending the token.
    let r = app
        .call(
            Method::POST,
            "/v1/workers/register",
            Auth::None,
            Some(json!({"token": secret, "csr": "not a csr"})),
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    let creds = test_worker::register(&app, &secret).await.unwrap();
    assert!(creds.worker_id.starts_with("wrk_"));
    let host = hosts::get(&app.db, &creds.worker_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(host.name, "rack-1");
    assert_eq!(host.state, "lost", "registered but not yet connected");
    assert!(host.cert_sha256.is_some());

    // Reuse, expiry and unknown tokens are all 401.
    test_worker::register(&app, &secret)
        .await
        .unwrap_err()
        .assert_error(StatusCode::UNAUTHORIZED);
    let (_, expired) = worker_tokens::create(&app.db, "old", None, now_ms() - 1)
        .await
        .unwrap();
    test_worker::register(&app, &expired)
        .await
        .unwrap_err()
        .assert_error(StatusCode::UNAUTHORIZED);
    test_worker::register(
        &app,
        &format!("{}{}", worker_tokens::PREFIX, "0".repeat(64)),
    )
    .await
    .unwrap_err()
    .assert_error(StatusCode::UNAUTHORIZED);
    // Only the hash is stored.
    let stored: Vec<(String,)> =
        sqlx::query_as("SELECT token_sha256 FROM worker_registration_tokens")
            .fetch_all(app.db.pool())
            .await
            .unwrap();
    assert!(
        stored
            .iter()
            .all(|(h,)| h.len() == 64 && !secret.contains(h.as_str()))
    );

    // The registered worker connects and shows as ready to admins only.
    let _w = TestWorker::connect(&creds, Profile::new(4, &["base"]), Arc::default())
        .await
        .unwrap();
    let r = app
        .call(
            Method::GET,
            "/v1/admin/hosts",
            Auth::Jwt(&admin.token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let listed = r.body.as_array().unwrap();
    let me = listed
        .iter()
        .find(|h| h["id"] == creds.worker_id.as_str())
        .unwrap();
    assert_eq!(me["state"], "ready");
    assert_eq!(me["templates"], json!(["base"]));
    assert_eq!(me["maxSandboxes"], 4);
    app.call(
        Method::GET,
        "/v1/admin/hosts",
        Auth::Jwt(&plain.token),
        None,
    )
    .await
    .assert_error(StatusCode::FORBIDDEN);
}

async fn certificates_from_another_ca_or_for_another_worker_are_refused(app: TestApp) {
    let admin = platform_admin(&app).await;
    let real = test_worker::register(&app, &token(&app, &admin).await)
        .await
        .unwrap();

    // Same worker id, certificate signed by a CA control does not trust.
    let rogue_ca = ControlCa::generate().unwrap();
    let (csr, key) = test_worker::csr();
    let rogue = rogue_ca.issue_worker(&csr, &real.worker_id).unwrap();
    let forged = Creds {
        cert_pem: rogue.pem,
        key_pem: key,
        ..real.clone()
    };
    let err = TestWorker::connect(&forged, Profile::new(1, &["base"]), Arc::default())
        .await
        .unwrap_err();
    // Refused by the TLS layer, before any message: never a protocol-level rejection.
    assert!(
        !matches!(err, ClientError::Rejected(_)),
        "TLS must refuse it first: {err:?}"
    );

    // A valid certificate whose hello claims another worker's id.
    let other = test_worker::register(&app, &token(&app, &admin).await)
        .await
        .unwrap();
    let err = TestWorker::connect_claiming(
        &other,
        &real.worker_id,
        Profile::new(1, &["base"]),
        Arc::default(),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("certificate belongs to"),
        "{err:#}"
    );

    assert!(app.channel().registry().connected().is_empty());
    assert_eq!(
        hosts::get(&app.db, &real.worker_id)
            .await
            .unwrap()
            .unwrap()
            .state,
        "lost"
    );
}

async fn create_pause_resume_metrics_kill_through_the_channel(app: TestApp) {
    let admin = platform_admin(&app).await;
    let w = worker(
        &app,
        &admin,
        Profile::new(4, &["base", "code-interpreter-v1"]),
    )
    .await;
    let key = tenant(&app, "a@example.com").await;

    let id = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    assert!(w.book.holds(&id));
    let body = sandbox(&app, &key, &id).await;
    assert_eq!(body["state"], "running");
    assert_eq!(body["hostId"], w.creds.worker_id.as_str());

    let r = app
        .call(
            Method::GET,
            &format!("/sandboxes/{id}/metrics"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body[0]["cpuUsedPct"], 12.5);

    let r = app
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/pause"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(w.book.held()[&id], WorkerSandboxState::Paused);
    let r = app
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/resume"),
            Auth::Key(&key),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(w.book.held()[&id], WorkerSandboxState::Running);

    let r = app
        .call(
            Method::DELETE,
            &format!("/sandboxes/{id}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert!(!w.book.holds(&id));
    assert_eq!(w.book.kills(), vec![id.clone()]);
    let r = app
        .call(
            Method::GET,
            &format!("/sandboxes/{id}"),
            Auth::Key(&key),
            None,
        )
        .await;
    r.assert_error(StatusCode::NOT_FOUND);
}

async fn egress_lists_reach_the_worker_on_create_and_resume(app: TestApp) {
    let admin = platform_admin(&app).await;
    let w = worker(&app, &admin, Profile::new(4, &["base"])).await;
    let key = tenant(&app, "a@example.com").await;
    let allow = json!(["10.0.0.0/8", "*.pypi.org"]);
    let deny = json!(["0.0.0.0/0"]);

    let id = app
        .e2b_sandbox(
            &key,
            json!({
                "templateID": "base", "allow_internet_access": false,
                "network": {"allowOut": allow, "denyOut": deny, "allowPublicTraffic": true}
            }),
        )
        .await;
    let lists = |spec: &roost_proto::control::CreateSandbox| {
        (
            spec.allow_internet,
            json!(spec.allow_out),
            json!(spec.deny_out),
        )
    };
    let sent = w.book.sent(&id);
    let [Sent::Create(created)] = sent.as_slice() else {
        panic!("one create expected, got {sent:?}");
    };
    assert_eq!(lists(created), (false, allow.clone(), deny.clone()));
    // The native view shows them as stored.
    let body = sandbox(&app, &key, &id).await;
    assert_eq!(body["allowOut"], allow);
    assert_eq!(body["denyOut"], deny);
    assert_eq!(body["allowInternet"], false);

    // Resume rebuilds the request from the stored sandbox: the same lists go out again.
    let path = format!("/sandboxes/{id}");
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
            &format!("{path}/resume"),
            Auth::Key(&key),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let sent = w.book.sent(&id);
    let [Sent::Create(_), Sent::Resume(resumed)] = sent.as_slice() else {
        panic!("create then resume expected, got {sent:?}");
    };
    assert_eq!(lists(resumed), (false, allow.clone(), deny.clone()));

    // The native route takes the same lists; without them the worker gets empty ones.
    let r = app
        .call(
            Method::POST,
            "/v1/sandboxes",
            Auth::Key(&key),
            Some(json!({"template": "base", "allowOut": ["pypi.org"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["allowOut"], json!(["pypi.org"]));
    assert_eq!(r.body["denyOut"], json!([]));
    let native = r.body["id"].as_str().unwrap();
    let sent = w.book.sent(native);
    let [Sent::Create(created)] = sent.as_slice() else {
        panic!("one create expected, got {sent:?}");
    };
    assert_eq!(lists(created), (true, json!(["pypi.org"]), json!([])));
    let plain = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let sent = w.book.sent(&plain);
    let [Sent::Create(created)] = sent.as_slice() else {
        panic!("one create expected, got {sent:?}");
    };
    assert!(created.allow_out.is_empty() && created.deny_out.is_empty());
}

async fn placement_is_capacity_aware_across_two_workers(app: TestApp) {
    let admin = platform_admin(&app).await;
    let a = worker(&app, &admin, Profile::new(1, &["base"])).await;
    let b = worker(&app, &admin, Profile::new(1, &["base"])).await;
    let key = tenant(&app, "a@example.com").await;

    let first = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let second = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    assert_eq!(a.book.held().len(), 1, "one sandbox per one-slot worker");
    assert_eq!(b.book.held().len(), 1);
    let hosts_used = [
        sandbox(&app, &key, &first).await["hostId"].clone(),
        sandbox(&app, &key, &second).await["hostId"].clone(),
    ];
    assert_ne!(hosts_used[0], hosts_used[1]);

    // Both full: a retryable 503 with a wait hint, and nothing left half-created.
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            Some(json!({"templateID": "base"})),
        )
        .await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("should-retry"), None);
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = app
        .call(
            Method::GET,
            "/v1/sandboxes?state=creating,running",
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(
        r.body["sandboxes"].as_array().unwrap().len(),
        2,
        "{}",
        r.text
    );

    // Freeing a slot makes room again once the worker's heartbeat says so.
    let r = app
        .call(
            Method::DELETE,
            &format!("/sandboxes/{first}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    eventually("a slot to free up", WAIT, || async {
        let r = app
            .call(
                Method::POST,
                "/v2/sandboxes",
                Auth::Key(&key),
                Some(json!({"templateID": "base"})),
            )
            .await;
        (r.status == StatusCode::CREATED).then_some(())
    })
    .await;
    assert_eq!(a.book.held().len() + b.book.held().len(), 2);
}

async fn placement_is_template_aware(app: TestApp) {
    let admin = platform_admin(&app).await;
    let base_only = worker(&app, &admin, Profile::new(8, &["base"])).await;
    let key = tenant(&app, "a@example.com").await;

    // No connected worker offers the template: 503 that retrying cannot fix.
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            Some(json!({"templateID": "code-interpreter-v1"})),
        )
        .await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("should-retry"), Some("false"));
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("code-interpreter-v1")
    );

    let interp = worker(&app, &admin, Profile::new(8, &["code-interpreter-v1"])).await;
    for _ in 0..3 {
        let id = app
            .e2b_sandbox(&key, json!({"templateID": "code-interpreter-v1"}))
            .await;
        assert!(interp.book.holds(&id));
        let id = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
        assert!(base_only.book.holds(&id));
    }
}

async fn a_vanished_worker_loses_its_sandboxes_within_the_bound(app: TestApp) {
    let admin = platform_admin(&app).await;
    let w = worker(&app, &admin, Profile::new(8, &["base"])).await;
    let key = tenant(&app, "a@example.com").await;
    let running = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let paused = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let r = app
        .call(
            Method::POST,
            &format!("/sandboxes/{paused}/pause"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    w.vanish();
    for id in [&running, &paused] {
        wait_for_state(&app, &key, id, "lost").await;
    }
    // The host row, the registry and the audit log follow the sweep, not atomically with it.
    eventually("the host marked lost and disconnected", WAIT, || async {
        let host = hosts::get(&app.db, &w.creds.worker_id)
            .await
            .unwrap()
            .unwrap();
        (host.state == "lost" && app.channel().registry().connected().is_empty()).then_some(())
    })
    .await;
    // Control closed the silent connection.
    let closed = tokio::time::timeout(WAIT, w.closed()).await.unwrap();
    assert!(
        matches!(
            closed,
            quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::TimedOut
        ),
        "{closed:?}"
    );

    // Audited by the system.
    eventually(
        "system audit entries for the host and its sandboxes",
        WAIT,
        || async {
            let actions: Vec<(String, Option<String>)> = sqlx::query_as(
                "SELECT action, target_id FROM audit_log WHERE actor_kind = 'system' ORDER BY id",
            )
            .fetch_all(app.db.pool())
            .await
            .unwrap();
            (actions.contains(&("host.lost".into(), Some(w.creds.worker_id.clone())))
                && [&running, &paused]
                    .iter()
                    .all(|id| actions.contains(&("sandbox.lost".into(), Some((*id).clone())))))
            .then_some(())
        },
    )
    .await;

    // New sandboxes have nowhere to go; a lost sandbox can still be killed.
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            Some(json!({"templateID": "base"})),
        )
        .await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE);
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{running}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
}

async fn reconnect_reconciles_both_ways(app: TestApp) {
    let admin = platform_admin(&app).await;
    let profile = Profile::new(8, &["base"]);
    let w = worker(&app, &admin, profile.clone()).await;
    let creds = w.creds.clone();
    let key = tenant(&app, "a@example.com").await;
    let survivor = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let killed_meanwhile = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let paused = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    let r = app
        .call(
            Method::POST,
            &format!("/sandboxes/{paused}/pause"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let died = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;

    w.vanish();
    wait_for_state(&app, &key, &survivor, "lost").await;
    // Killed while its host was away: control records it, the worker hears later.
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{killed_meanwhile}"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let book = w.disconnect().await;
    // One VM did not survive the outage, and one the worker has that control never placed.
    book.forget(&died);
    let orphan = roost_proto::SandboxId::generate()
        .unwrap()
        .as_str()
        .to_owned();
    book.adopt(&orphan, WorkerSandboxState::Running);

    let back = TestWorker::connect(&creds, profile.clone(), book.clone())
        .await
        .unwrap();
    wait_for_state(&app, &key, &survivor, "running").await;
    let body = wait_for_state(&app, &key, &paused, "paused").await;
    assert_eq!(body["hostId"], creds.worker_id.as_str());
    wait_for_state(&app, &key, &died, "lost").await;
    eventually(
        "the worker to be told to kill what control does not want",
        WAIT,
        || async {
            let kills = back.book.kills();
            (kills.contains(&killed_meanwhile) && kills.contains(&orphan)).then_some(())
        },
    )
    .await;
    assert!(!back.book.holds(&killed_meanwhile) && !back.book.holds(&orphan));
    assert!(back.book.holds(&survivor));
    assert_eq!(
        hosts::get(&app.db, &creds.worker_id)
            .await
            .unwrap()
            .unwrap()
            .state,
        "ready"
    );

    // A running sandbox the worker drops while connected is not marked lost by heartbeats
    // (they cannot tell it from a kill in flight), but on the next reconnect it is.
    back.book.forget(&survivor);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sandbox(&app, &key, &survivor).await["state"], "running");
    let book = back.disconnect().await;
    let _again = TestWorker::connect(&creds, profile, book).await.unwrap();
    wait_for_state(&app, &key, &survivor, "lost").await;
    // The audit entries are written beside the state changes, not atomically with them.
    eventually("audit entries for both reappeared sandboxes", WAIT, || async {
        let reappeared: Vec<(Option<String>,)> = sqlx::query_as(
            "SELECT target_id FROM audit_log WHERE actor_kind = 'system' AND action = 'sandbox.reappeared'",
        )
        .fetch_all(app.db.pool())
        .await
        .unwrap();
        (reappeared.contains(&(Some(survivor.clone()),))
            && reappeared.contains(&(Some(paused.clone()),)))
        .then_some(())
    })
    .await;
}

async fn a_replacing_connection_takes_over_and_the_old_one_is_closed(app: TestApp) {
    let admin = platform_admin(&app).await;
    let first = worker(&app, &admin, Profile::new(2, &["base"])).await;
    let second = TestWorker::connect(&first.creds, Profile::new(2, &["base"]), first.book.clone())
        .await
        .unwrap();
    let closed = tokio::time::timeout(WAIT, first.closed()).await.unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    assert_eq!(
        app.channel().registry().connected(),
        vec![second.creds.worker_id.clone()]
    );
    let key = tenant(&app, "a@example.com").await;
    let id = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
    assert!(second.book.holds(&id));
}

async fn a_restarted_control_finds_lost_hosts_from_the_database(app: TestApp) {
    let admin = platform_admin(&app).await;
    let w = worker(&app, &admin, Profile::new(8, &["base"])).await;
    let key = tenant(&app, "a@example.com").await;
    let id = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;

    // The control instance the worker was connected to goes away (the worker with it).
    app.channel().close();
    w.vanish();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sandbox(&app, &key, &id).await["state"], "running");

    // A new instance on the same database never saw the worker connect, yet marks it lost.
    let next = WorkerChannel::start(
        app.db.clone(),
        &ControlCa::generate().unwrap(),
        common::test_channel_config(),
    )
    .await
    .unwrap();
    wait_for_state(&app, &key, &id, "lost").await;
    let host = hosts::get(&app.db, &w.creds.worker_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(host.state, "lost");
    next.close();
}

async fn unsupported_protocol_versions_are_rejected(app: TestApp) {
    let admin = platform_admin(&app).await;
    let creds = test_worker::register(&app, &token(&app, &admin).await)
        .await
        .unwrap();
    for version in [0, roost_proto::control::PROTOCOL_VERSION + 1] {
        let err =
            TestWorker::connect_with(&creds, Profile::new(1, &["base"]), Arc::default(), |h| {
                h.protocol_version = version;
            })
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("protocol version"), "{err:#}");
    }
    assert!(app.channel().registry().connected().is_empty());
    // The same credentials with a proper hello are fine.
    TestWorker::connect(&creds, Profile::new(1, &["base"]), Arc::default())
        .await
        .unwrap();
}

async fn a_create_the_worker_never_answers_times_out_and_is_reconciled_away(app: TestApp) {
    let admin = platform_admin(&app).await;
    let w = worker(&app, &admin, Profile::new(4, &["base"])).await;
    let key = tenant(&app, "a@example.com").await;
    w.book.answer_no_creates();
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            Some(json!({"templateID": "base"})),
        )
        .await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("retry-after"), Some("1"));
    // The worker started it anyway; control recorded the create as failed, so the next
    // heartbeat's reconciliation has the worker kill it.
    let held: Vec<String> = w.book.held().into_keys().collect();
    assert_eq!(held.len(), 1);
    let stray = held[0].clone();
    assert_eq!(sandbox(&app, &key, &stray).await["state"], "killed");
    eventually("the stray sandbox to be killed", WAIT, || async {
        (!w.book.holds(&stray)).then_some(())
    })
    .await;
    assert_eq!(w.book.kills(), vec![stray]);
}

async fn hundreds_of_unknown_sandboxes_are_reconciled_in_one_hello(app: TestApp) {
    let admin = platform_admin(&app).await;
    let creds = test_worker::register(&app, &token(&app, &admin).await)
        .await
        .unwrap();
    let key = tenant(&app, "a@example.com").await;
    // More than one `IN (...)` chunk of lookups: 600 orphans control never placed.
    let book = Arc::new(test_worker::Book::default());
    let orphans: Vec<String> = (0..600)
        .map(|_| {
            roost_proto::SandboxId::generate()
                .unwrap()
                .as_str()
                .to_owned()
        })
        .collect();
    for id in &orphans {
        book.adopt(id, WorkerSandboxState::Running);
    }
    let w = TestWorker::connect(&creds, Profile::new(1000, &["base"]), book)
        .await
        .unwrap();
    eventually("every orphan to be killed", WAIT, || async {
        w.book.held().is_empty().then_some(())
    })
    .await;
    // The orphans filled the host's vCPUs; once a heartbeat shows them gone, it takes work.
    let known = eventually("the emptied worker to take a sandbox", WAIT, || async {
        let r = app
            .call(
                Method::POST,
                "/v2/sandboxes",
                Auth::Key(&key),
                Some(json!({"templateID": "base"})),
            )
            .await;
        r.body["sandboxID"].as_str().map(str::to_owned)
    })
    .await;
    assert!(w.book.holds(&known));
    let mut killed = w.book.kills();
    killed.sort();
    killed.dedup();
    let mut expected = orphans.clone();
    expected.sort();
    assert_eq!(killed, expected);
}

on_both_backends_with_channel!(
    registration_tokens_are_single_use_and_expire,
    certificates_from_another_ca_or_for_another_worker_are_refused,
    create_pause_resume_metrics_kill_through_the_channel,
    egress_lists_reach_the_worker_on_create_and_resume,
    placement_is_capacity_aware_across_two_workers,
    placement_is_template_aware,
    a_vanished_worker_loses_its_sandboxes_within_the_bound,
    reconnect_reconciles_both_ways,
    a_replacing_connection_takes_over_and_the_old_one_is_closed,
    a_restarted_control_finds_lost_hosts_from_the_database,
    unsupported_protocol_versions_are_rejected,
    a_create_the_worker_never_answers_times_out_and_is_reconciled_away,
    hundreds_of_unknown_sandboxes_are_reconciled_in_one_hello,
);
