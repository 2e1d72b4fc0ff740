//! `roost serve control` as an operator runs it: the real binary on a temporary data
//! directory and OS-chosen ports, driven over HTTP and joined by an in-process worker over the
//! real QUIC channel (`roost_control::workers::client`). Covers the first administrator,
//! registration, placement of an E2B sandbox on that worker, kill, a clean SIGTERM shutdown,
//! and refusals of bad configuration. The PostgreSQL variant runs on a scratch database at
//! `ROOST_TEST_POSTGRES_URL` (default `postgres://roost_test:roost_test@127.0.0.1:5432/roost_test`).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use roost_control::workers::client::{Handler, Identity, Session, Status};
use roost_proto::control::{
    Capacity, ErrorKind, Hello, Operation, Outcome, PROTOCOL_VERSION, SandboxReport, Usage,
    WorkerError, WorkerSandboxState,
};
use serde_json::{Value, json};
use sqlx::Connection;
use support::{ADMIN_EMAIL, ADMIN_PASSWORD, Proc, ROOST, try_start_control};
/// Startup includes hashing the admin password at production cost in a debug build.
const START_WITHIN: Duration = Duration::from_secs(90);
const EXIT_WITHIN: Duration = Duration::from_secs(15);

/// A running `roost serve control` process.
struct Control {
    process: Proc,
    api: SocketAddr,
}

impl Control {
    /// Starts the binary with `args` after the common ones and waits for its ready line; the
    /// error holds its output when it exits first.
    fn start(data_dir: &std::path::Path, extra: &[&str]) -> Result<Self, String> {
        // Defaults an individual test may replace through `extra`.
        let mut args: Vec<&str> = Vec::new();
        for (flag, value) in [
            ("--listen", "127.0.0.1:0"),
            ("--channel-listen", "127.0.0.1:0"),
            ("--heartbeat-interval", "200ms"),
            ("--host-lost-after", "5s"),
            ("--bootstrap-admin", ADMIN_EMAIL),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        let (process, api) = try_start_control(
            Command::new(ROOST)
                .args(["serve", "control", "--data-dir"])
                .arg(data_dir)
                .args(&args)
                .args(extra)
                .env("ROOST_ADMIN_PASSWORD", ADMIN_PASSWORD)
                .env("RUST_LOG", "info")
                .env_remove("ROOST_DATABASE_URL")
                .env_remove("ROOST_REDIS_URL"),
            START_WITHIN,
        )?;
        Ok(Self { process, api })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(self) -> std::process::ExitStatus {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends `signal` and waits for the exit status.
    fn stop_with(mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        self.process.stop_with(signal, EXIT_WITHIN)
    }
}

/// Runs `roost` to completion with `args`, returning (status, stdout, stderr).
fn run_roost(args: &[&str], envs: &[(&str, &str)]) -> (std::process::ExitStatus, String, String) {
    let mut cmd = Command::new(ROOST);
    cmd.args(args)
        .env_remove("ROOST_DATABASE_URL")
        .env_remove("ROOST_ADMIN_PASSWORD")
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run roost");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Http(Client<HttpConnector, Full<Bytes>>);

enum Auth<'a> {
    None,
    Jwt(&'a str),
    Key(&'a str),
}

impl Http {
    fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }

    async fn call(
        &self,
        method: &str,
        url: &str,
        auth: Auth<'_>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = hyper::Request::builder().method(method).uri(url);
        match auth {
            Auth::None => {}
            Auth::Jwt(t) => req = req.header("authorization", format!("Bearer {t}")),
            Auth::Key(k) => req = req.header("x-api-key", k),
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = self.0.request(req.body(body).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// A worker that holds sandboxes in a map and answers at once.
#[derive(Default)]
struct MapWorker {
    held: Mutex<BTreeMap<String, WorkerSandboxState>>,
    kills: Mutex<Vec<String>>,
}

#[async_trait]
impl Handler for MapWorker {
    async fn handle(&self, operation: Operation) -> Result<Outcome, WorkerError> {
        let mut held = self.held.lock().unwrap();
        match operation {
            Operation::Create(spec) => {
                held.insert(spec.sandbox_id, WorkerSandboxState::Running);
                Ok(Outcome::Created)
            }
            Operation::Kill { sandbox_id } => {
                self.kills.lock().unwrap().push(sandbox_id.clone());
                held.remove(&sandbox_id);
                Ok(Outcome::Killed)
            }
            other => Err(WorkerError {
                kind: ErrorKind::InvalidState,
                message: format!("test worker does not do {other:?}"),
            }),
        }
    }

    fn status(&self) -> Status {
        let held = self.held.lock().unwrap();
        Status {
            usage: Usage {
                sandboxes: u32::try_from(held.len()).unwrap(),
                ..Usage::default()
            },
            templates: vec!["base".into()],
            sandboxes: held
                .iter()
                .map(|(id, state)| SandboxReport {
                    sandbox_id: id.clone(),
                    state: *state,
                })
                .collect(),
        }
    }
}

async fn wait_healthy(http: &Http, control: &Control) {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        let (status, body) = http
            .call("GET", &control.url("/health"), Auth::None, None)
            .await;
        if status == 200 {
            assert_eq!(body["status"], "ok");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/health never became 200 (last {status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A worker joined over QUIC and a tenant's API key, on a running control.
struct Joined {
    session: Session,
    worker: Arc<MapWorker>,
    worker_id: String,
    channel: SocketAddr,
    key: String,
}

/// The bootstrapped admin issues a registration token, a [`MapWorker`] registers and joins,
/// and a tenant signs up and creates an API key.
async fn join_worker_and_tenant(http: &Http, control: &Control) -> Joined {
    // The bootstrapped admin logs in and issues a registration token.
    let (status, session) = http
        .call(
            "POST",
            &control.url("/v1/auth/login"),
            Auth::None,
            Some(json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})),
        )
        .await;
    assert_eq!(status, 200, "{session}");
    let admin_jwt = session["token"].as_str().unwrap().to_owned();
    let (status, token) = http
        .call(
            "POST",
            &control.url("/v1/admin/workers/registration-tokens"),
            Auth::Jwt(&admin_jwt),
            Some(json!({"name": "rack-1"})),
        )
        .await;
    assert_eq!(status, 201, "{token}");

    // A worker registers over REST and joins over QUIC.
    let (key_pem, csr) = roost_control::pki::new_key_and_csr().unwrap();
    let (status, reg) = http
        .call(
            "POST",
            &control.url("/v1/workers/register"),
            Auth::None,
            Some(json!({"token": token["token"], "csr": csr})),
        )
        .await;
    assert_eq!(status, 201, "{reg}");
    let worker_id = reg["workerId"].as_str().unwrap().to_owned();
    let identity = Identity {
        worker_id: worker_id.clone(),
        ca_pem: reg["caCertificatePem"].as_str().unwrap().to_owned(),
        cert_pem: reg["certificatePem"].as_str().unwrap().to_owned(),
        key_pem,
        server_name: reg["serverName"].as_str().unwrap().to_owned(),
        control_addr: reg["channelAddress"].as_str().unwrap().parse().unwrap(),
    };
    let worker = Arc::new(MapWorker::default());
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        worker_id: worker_id.clone(),
        worker_version: "serve-control-test".into(),
        capacity: Capacity {
            vcpus: 64,
            memory_mib: 64 * 1024,
            disk_mib: 1024 * 1024,
            max_sandboxes: 8,
        },
        templates: vec!["base".into()],
        usage: Usage::default(),
        sandboxes: Vec::new(),
    };
    let session = Session::join(&identity, hello, worker.clone())
        .await
        .expect("worker joins over QUIC");

    // A tenant's API key creates an E2B sandbox; it lands on that worker.
    let (status, user) = http
        .call(
            "POST",
            &control.url("/v1/auth/signup"),
            Auth::None,
            Some(json!({"email": "dev@example.com", "password": "password123"})),
        )
        .await;
    assert_eq!(status, 201, "{user}");
    let (status, key) = http
        .call(
            "POST",
            &control.url(&format!(
                "/v1/teams/{}/api-keys",
                user["teamId"].as_str().unwrap()
            )),
            Auth::Jwt(user["token"].as_str().unwrap()),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let key = key["key"].as_str().unwrap().to_owned();
    Joined {
        session,
        worker,
        worker_id,
        channel: identity.control_addr,
        key,
    }
}

/// The whole operator path on one running binary; returns after a clean SIGTERM.
async fn smoke(data_dir: &std::path::Path, extra: &[&str]) {
    const GATEWAY_TOKEN: &str = "gateway-token-0123456789abcdef0123";
    let mut args = vec!["--internal-token", GATEWAY_TOKEN];
    args.extend_from_slice(extra);
    let control = Control::start(data_dir, &args).unwrap_or_else(|e| panic!("{e}"));
    let http = Http::new();
    wait_healthy(&http, &control).await;
    let (status, doc) = http
        .call("GET", &control.url("/openapi.json"), Auth::None, None)
        .await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v2/sandboxes"].is_object());
    assert!(doc["paths"]["/health"]["get"].is_object());

    let Joined {
        session,
        worker,
        worker_id,
        channel,
        key,
    } = join_worker_and_tenant(&http, &control).await;
    let (status, created) = http
        .call(
            "POST",
            &control.url("/v2/sandboxes"),
            Auth::Key(&key),
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"].as_str().unwrap().to_owned();
    assert!(worker.held.lock().unwrap().contains_key(&id));
    let (status, info) = http
        .call(
            "GET",
            &control.url(&format!("/v1/sandboxes/{id}")),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["hostId"], worker_id.as_str());
    assert_eq!(info["state"], "running");
    // The gateway's route lookup, with the token given on the command line.
    let route = control.url(&format!("/internal/v1/routes/{id}"));
    let (status, body) = http
        .call("GET", &route, Auth::Jwt(GATEWAY_TOKEN), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["worker_id"], worker_id.as_str());
    let (status, body) = http.call("GET", &route, Auth::Jwt(&key), None).await;
    assert_eq!(status, 401, "{body}");

    let (status, body) = http
        .call(
            "DELETE",
            &control.url(&format!("/sandboxes/{id}")),
            Auth::Key(&key),
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(*worker.kills.lock().unwrap(), vec![id.clone()]);
    assert!(!worker.held.lock().unwrap().contains_key(&id));

    // SIGTERM: exit 0 promptly, the worker's connection is closed, nothing listens.
    let api = control.api;
    let status = tokio::task::spawn_blocking(move || control.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    tokio::time::timeout(Duration::from_secs(5), session.closed())
        .await
        .expect("control closed the worker connection on shutdown");
    assert!(
        std::net::TcpStream::connect(api).is_err(),
        "something still listens on {api}"
    );
    // The QUIC port is free again: binding it succeeds.
    std::net::UdpSocket::bind(channel).expect("worker channel port released");
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_places_kills_and_shuts_down_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    smoke(dir.path(), &[]).await;
    // The data dir holds what the next start needs, with private keys private.
    for (file, private) in [
        ("control.db", false),
        ("worker-ca.pem", false),
        ("worker-ca.key", true),
        ("session-secret", true),
    ] {
        let meta = std::fs::metadata(dir.path().join(file))
            .unwrap_or_else(|e| panic!("{file} missing: {e}"));
        if private {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o077, 0, "{file} is not 0600");
        }
    }
    // A restart on the same data dir keeps the admin (idempotent bootstrap) and works again.
    smoke_restart(dir.path()).await;
}

/// A second start on an existing data dir keeps the admin's password; Ctrl-C (SIGINT) stops
/// it as cleanly as SIGTERM.
async fn smoke_restart(data_dir: &std::path::Path) {
    let control = Control::start(data_dir, &[]).unwrap_or_else(|e| panic!("{e}"));
    let http = Http::new();
    wait_healthy(&http, &control).await;
    let (status, _) = http
        .call(
            "POST",
            &control.url("/v1/auth/login"),
            Auth::None,
            Some(json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})),
        )
        .await;
    assert_eq!(status, 200);
    let status =
        tokio::task::spawn_blocking(move || control.stop_with(nix::sys::signal::Signal::SIGINT))
            .await
            .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_places_kills_and_shuts_down_on_postgres() {
    let admin_url = std::env::var("ROOST_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        "postgres://roost_test:roost_test@127.0.0.1:5432/roost_test".to_owned()
    });
    sqlx::any::install_default_drivers();
    let name = format!(
        "roost_serve_{}",
        roost_control::store::random_id("", 8).unwrap()
    );
    let mut admin = sqlx::AnyConnection::connect(&admin_url)
        .await
        .expect("PostgreSQL must be reachable (set ROOST_TEST_POSTGRES_URL)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let (base, query) = admin_url
        .split_once('?')
        .map_or((admin_url.as_str(), None), |(b, q)| (b, Some(q)));
    let prefix = base.rsplit_once('/').map_or(base, |(p, _)| p);
    let url = match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let outcome = tokio::spawn({
        let dir = dir.path().to_owned();
        async move { smoke(&dir, &["--database-url", &url]).await }
    })
    .await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    // SQLite was not used.
    assert!(!dir.path().join("control.db").exists());
}

#[test]
fn refuses_a_bad_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let err = Control::start(dir.path(), &["--database-url", "mysql://localhost/x"])
        .err()
        .expect("a mysql URL is refused");
    assert!(
        err.contains("sqlite:") && err.contains("postgres://"),
        "message should say which URLs work: {err}"
    );
    // An unreachable PostgreSQL fails quickly with the target named, password hidden.
    let started = Instant::now();
    let err = Control::start(
        dir.path(),
        &["--database-url", "postgres://u:hunter2@127.0.0.1:1/x"],
    )
    .err()
    .expect("an unreachable database is refused");
    assert!(
        err.contains("cannot open the database postgres://u@127.0.0.1:1/x"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "password leaked: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn refuses_an_occupied_port() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = Control::start(dir.path(), &["--listen", &addr])
        .err()
        .expect("an occupied port is refused");
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap().to_string();
    let err = Control::start(dir.path(), &["--channel-listen", &addr])
        .err()
        .expect("an occupied channel port is refused");
    assert!(
        err.contains(&addr) && err.contains("--channel-listen"),
        "{err}"
    );
}

/// `roost control admin create --email EMAIL` on `dir`, with `envs`.
fn admin_create(
    dir: &std::path::Path,
    email: &str,
    envs: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String) {
    let dir = dir.to_str().unwrap();
    run_roost(
        &[
            "control",
            "admin",
            "create",
            "--email",
            email,
            "--data-dir",
            dir,
        ],
        envs,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_create_is_idempotent_and_a_generated_password_logs_in() {
    let dir = tempfile::tempdir().unwrap();
    let (status, out, err) = admin_create(
        dir.path(),
        "a@example.com",
        &[("ROOST_ADMIN_PASSWORD", "password123")],
    );
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("created platform administrator a@example.com"),
        "{out}"
    );
    assert!(
        !out.contains("password123"),
        "a given password is not echoed: {out}"
    );
    let (status, out, err) = admin_create(dir.path(), "a@example.com", &[]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("already a platform administrator"), "{out}");
    let (status, out, err) = admin_create(dir.path(), "not-an-email", &[]);
    assert!(!status.success(), "{out}");
    assert!(err.contains("not a valid email address"), "{err}");

    // Without ROOST_ADMIN_PASSWORD a password is generated and shown once; it works.
    let (status, out, err) = admin_create(dir.path(), "b@example.com", &[]);
    assert!(status.success(), "{out}{err}");
    let password = out
        .split("password (shown once): ")
        .nth(1)
        .unwrap_or_else(|| panic!("no generated password in {out:?}"))
        .trim()
        .to_owned();
    assert!(password.len() >= 16, "{password}");
    let control = Control::start(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let http = Http::new();
    wait_healthy(&http, &control).await;
    let (status, session) = http
        .call(
            "POST",
            &control.url("/v1/auth/login"),
            Auth::None,
            Some(json!({"email": "b@example.com", "password": password})),
        )
        .await;
    assert_eq!(status, 200, "{session}");
    // b is a platform admin: may list hosts.
    let (status, hosts) = http
        .call(
            "GET",
            &control.url("/v1/admin/hosts"),
            Auth::Jwt(session["token"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{hosts}");
    let status = tokio::task::spawn_blocking(move || control.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn refuses_loose_key_files_and_an_unusable_data_dir() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // Create the CA with a first run, then loosen its key.
    let control = Control::start(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    drop(control);
    let key = dir.path().join("worker-ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Control::start(dir.path(), &[])
        .err()
        .expect("loose CA key refused");
    assert!(
        err.contains("worker-ca.key") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A session secret file others can read, or one that does not exist.
    let secret = dir.path().join("my-secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let secret_arg = secret.to_str().unwrap();
    let err = Control::start(dir.path(), &["--jwt-secret-file", secret_arg])
        .err()
        .expect("loose secret refused");
    assert!(
        err.contains("my-secret") && err.contains("chmod 600"),
        "{err}"
    );
    let missing = dir.path().join("missing-secret");
    let err = Control::start(
        dir.path(),
        &["--jwt-secret-file", missing.to_str().unwrap()],
    )
    .err()
    .expect("missing secret refused");
    assert!(err.contains("missing-secret"), "{err}");

    // A data dir that is a regular file.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let err = Control::start(&file, &[])
        .err()
        .expect("file as data dir refused");
    assert!(
        err.contains("data directory") && err.contains("not-a-dir"),
        "{err}"
    );
}

#[test]
fn refuses_unreachable_redis_and_inconsistent_timings() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let err = Control::start(dir.path(), &["--redis-url", "redis://127.0.0.1:1"])
        .err()
        .expect("an unreachable Redis is refused");
    assert!(
        err.contains("cannot connect to Redis at redis://127.0.0.1:1"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "took {:?}",
        started.elapsed()
    );

    let err = Control::start(
        dir.path(),
        &["--heartbeat-interval", "2s", "--host-lost-after", "1s"],
    )
    .err()
    .expect("lost-after shorter than a heartbeat is refused");
    assert!(err.contains("more than one heartbeat interval"), "{err}");
    let err = Control::start(dir.path(), &["--heartbeat-interval", "5h"])
        .err()
        .expect("unknown unit refused");
    assert!(err.contains("unknown unit"), "{err}");
    let err = Control::start(dir.path(), &["--reaper-interval", "0s"])
        .err()
        .expect("a zero reaper interval is refused");
    assert!(err.contains("reaper interval must be positive"), "{err}");
    let err = Control::start(dir.path(), &["--internal-token", "short"])
        .err()
        .expect("a short internal token is refused");
    assert!(err.contains("at least 32 characters"), "{err}");
}

/// Polls `GET /v1/sandboxes/{id}` until its state is `want`, for at most `within`.
async fn wait_for_state(
    http: &Http,
    control: &Control,
    key: &str,
    id: &str,
    want: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let (status, info) = http
            .call(
                "GET",
                &control.url(&format!("/v1/sandboxes/{id}")),
                Auth::Key(key),
                None,
            )
            .await;
        assert_eq!(status, 200, "{info}");
        if info["state"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox {id} not {want} within {within:?}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The background tasks the binary spawns act: the reaper kills a sandbox whose timeout
/// passed (on the worker too), and the lost-host sweep marks a silent worker's sandbox lost.
#[tokio::test(flavor = "multi_thread")]
async fn reaper_and_lost_host_sweep_run() {
    let dir = tempfile::tempdir().unwrap();
    let control = Control::start(
        dir.path(),
        &[
            "--heartbeat-interval",
            "100ms",
            "--host-lost-after",
            "1s",
            "--reaper-interval",
            "200ms",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let http = Http::new();
    wait_healthy(&http, &control).await;
    let joined = join_worker_and_tenant(&http, &control).await;
    let create = |timeout: u64| {
        let http = &http;
        let control = &control;
        let key = joined.key.clone();
        async move {
            let (status, created) = http
                .call(
                    "POST",
                    &control.url("/v2/sandboxes"),
                    Auth::Key(&key),
                    Some(json!({"templateID": "base", "timeout": timeout})),
                )
                .await;
            assert_eq!(status, 201, "{created}");
            created["sandboxID"].as_str().unwrap().to_owned()
        }
    };
    // Reaper (every 200 ms): a 1 s timeout ends in a kill on the worker.
    let short = create(1).await;
    let long = create(600).await;
    wait_for_state(
        &http,
        &control,
        &joined.key,
        &short,
        "killed",
        Duration::from_secs(20),
    )
    .await;
    assert!(joined.worker.kills.lock().unwrap().contains(&short));

    // Lost-host sweep: the worker stops heartbeating; its running sandbox becomes lost.
    joined.session.halt();
    wait_for_state(
        &http,
        &control,
        &joined.key,
        &long,
        "lost",
        Duration::from_secs(15),
    )
    .await;

    let status = tokio::task::spawn_blocking(move || control.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}
