//! Host administration over the real worker channel (test workers over QUIC, control on
//! SQLite and PostgreSQL): draining (no new placements, sandboxes keep running, survives
//! reconnects and heartbeats, undrain) and worker certificate renewal over the channel (new
//! certificate from the CA, the previous one still accepted until it expires or is replaced).

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::test_worker::{Creds, Profile, TestWorker, join, platform_admin};
use common::{Auth, TestApp, User};
use roost_control::pki::{self, fingerprint};
use roost_control::store::hosts;
use roost_control::workers::client::ClientError;
use roost_proto::control::ErrorKind;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

async fn host_of(app: &TestApp, key: &str, id: &str) -> String {
    let r = app
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            Auth::Key(key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["hostId"].as_str().unwrap().to_owned()
}

async fn drain(app: &TestApp, admin: &User, host: &str, on: bool) -> common::Resp {
    let verb = if on { "drain" } else { "undrain" };
    app.call(
        Method::POST,
        &format!("/v1/admin/hosts/{host}/{verb}"),
        Auth::Jwt(&admin.token),
        None,
    )
    .await
}

/// `(action, actor_kind)` of the audit entries about `target`, oldest first.
async fn audit_of(app: &TestApp, target: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT action, actor_kind FROM audit_log WHERE target_id = $1 ORDER BY id")
        .bind(target)
        .fetch_all(app.db.pool())
        .await
        .unwrap()
}

async fn a_draining_host_takes_nothing_new(app: TestApp) {
    let admin = platform_admin(&app, "ops@example.com").await;
    let a = join(
        &app,
        &admin,
        Profile::new(16, &["base", "code-interpreter-v1"]),
    )
    .await;
    let b = join(&app, &admin, Profile::new(16, &["base"])).await;
    let a_id = a.creds.worker_id.clone();
    let key = app.api_key(&app.signup("dev@example.com").await).await;
    let before = app
        .e2b_sandbox(&key, json!({"templateID": "code-interpreter-v1"}))
        .await;
    assert_eq!(host_of(&app, &key, &before).await, a_id);

    // Only platform admins drain; unknown hosts are 404.
    let plain = app.signup("dev2@example.com").await;
    drain(&app, &plain, &a_id, true)
        .await
        .assert_error(StatusCode::FORBIDDEN);
    drain(&app, &admin, "wrk_nosuchhost", true)
        .await
        .assert_error(StatusCode::NOT_FOUND);
    let r = drain(&app, &admin, &a_id, true).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["draining"], true);
    assert_eq!(r.body["state"], "ready");

    // New sandboxes go elsewhere, though A has more room; the only host with the template
    // being drained is "no capacity, retry later", not "no such template".
    for _ in 0..4 {
        let id = app.e2b_sandbox(&key, json!({"templateID": "base"})).await;
        assert_eq!(host_of(&app, &key, &id).await, b.creds.worker_id);
    }
    let r = app
        .call(
            Method::POST,
            "/v2/sandboxes",
            Auth::Key(&key),
            Some(json!({"templateID": "code-interpreter-v1"})),
        )
        .await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("retry-after"), Some("1"));

    // A's sandbox keeps running and answers (metrics come from the worker).
    let r = app
        .call(
            Method::GET,
            &format!("/sandboxes/{before}/metrics"),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert!(a.book.holds(&before));

    // Heartbeats and a reconnect keep it draining (the flag lives in the database).
    let creds = a.creds.clone();
    let book = a.disconnect().await;
    let a = TestWorker::connect(
        &creds,
        Profile::new(16, &["base", "code-interpreter-v1"]),
        book,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let hosts = app
        .call(
            Method::GET,
            "/v1/admin/hosts",
            Auth::Jwt(&admin.token),
            None,
        )
        .await;
    let listed: &Value = hosts
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == a_id.as_str())
        .unwrap();
    assert_eq!(listed["draining"], true, "{listed}");
    assert_eq!(listed["state"], "ready", "{listed}");
    app.call(
        Method::POST,
        "/v2/sandboxes",
        Auth::Key(&key),
        Some(json!({"templateID": "code-interpreter-v1"})),
    )
    .await
    .assert_error(StatusCode::SERVICE_UNAVAILABLE);

    // Undrain: A takes sandboxes again.
    let r = drain(&app, &admin, &a_id, false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["draining"], false);
    let id = app
        .e2b_sandbox(&key, json!({"templateID": "code-interpreter-v1"}))
        .await;
    assert_eq!(host_of(&app, &key, &id).await, a_id);
    assert!(a.book.holds(&id));
    let drains: Vec<(String, String)> = audit_of(&app, &a_id)
        .await
        .into_iter()
        .filter(|(action, _)| action.contains("drain"))
        .collect();
    assert_eq!(
        drains,
        vec![
            ("host.drain".to_owned(), "user".to_owned()),
            ("host.undrain".to_owned(), "user".to_owned())
        ]
    );
}

fn sha256_of_pem(pem: &str) -> String {
    fingerprint(&CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
}

async fn certificates_are_renewed_over_the_channel(app: TestApp) {
    let admin = platform_admin(&app, "ops@example.com").await;
    let worker = join(&app, &admin, Profile::new(4, &["base"])).await;
    let id = worker.creds.worker_id.clone();
    let original = worker.creds.clone();
    let original_sha = sha256_of_pem(&original.cert_pem);

    // A garbage CSR is refused with a typed error and changes nothing.
    let err = worker
        .session()
        .renew_certificate("not a csr")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(e) if e.kind == ErrorKind::InvalidRequest),
        "{err:?}"
    );

    let (key, csr) = pki::new_key_and_csr().unwrap();
    let renewed = worker.session().renew_certificate(&csr).await.unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        renewed.not_after_unix > now + 300 * 24 * 3600,
        "{renewed:?}"
    );
    let renewed_sha = sha256_of_pem(&renewed.certificate_pem);
    let host = hosts::get(&app.db, &id).await.unwrap().unwrap();
    assert_eq!(host.cert_sha256.as_deref(), Some(renewed_sha.as_str()));
    assert_eq!(
        host.previous_cert_sha256.as_deref(),
        Some(original_sha.as_str())
    );
    assert!(
        audit_of(&app, &id)
            .await
            .contains(&("host.certificate_renew".to_owned(), "system".to_owned()))
    );

    // The new certificate (with its new key) connects; so does the old one, until replaced.
    let book = worker.disconnect().await;
    let fresh = Creds {
        cert_pem: renewed.certificate_pem.clone(),
        key_pem: key,
        ..original.clone()
    };
    let worker = TestWorker::connect(&fresh, Profile::new(4, &["base"]), book)
        .await
        .unwrap();
    let old = TestWorker::connect(&original, Profile::new(4, &["base"]), Arc::default())
        .await
        .unwrap();
    // (The older connection replaced the newer one for this host; both certificates work.)
    drop(old);
    drop(worker);

    // A second renewal drops the oldest certificate: it no longer connects.
    let again = TestWorker::connect(&fresh, Profile::new(4, &["base"]), Arc::default())
        .await
        .unwrap();
    let (_, csr) = pki::new_key_and_csr().unwrap();
    again.session().renew_certificate(&csr).await.unwrap();
    let refused = TestWorker::connect(&original, Profile::new(4, &["base"]), Arc::default()).await;
    assert!(refused.is_err(), "the oldest certificate must be refused");
    // The certificate it replaced still works.
    drop(again);
    TestWorker::connect(&fresh, Profile::new(4, &["base"]), Arc::default())
        .await
        .unwrap();
}

#[test]
fn renewal_is_due_in_the_last_third_of_validity() {
    use roost_control::workers::client::renewal_due;
    let year = i64::try_from(pki::WORKER_CERT_VALIDITY.as_secs()).unwrap();
    let now = 1_000_000_000;
    assert!(!renewal_due(now + year, now));
    assert!(!renewal_due(now + year / 2, now));
    assert!(renewal_due(now + year / 4, now));
    assert!(renewal_due(now - 1, now));
}

on_both_backends_with_channel!(
    a_draining_host_takes_nothing_new,
    certificates_are_renewed_over_the_channel,
);
