//! `roost serve worker` against a real `roost serve control`, without KVM: the worker offers a
//! template whose snapshot directory holds a state file the VMM refuses, so everything but a
//! running VM is exercised on the real binaries — registration with a token, credentials kept
//! 0600 and reused by a restart without a token, the host and its templates as control sees
//! them, a create that fails cleanly (control answers with the VMM's reason; nothing is left in
//! the runtime root), a stale runtime directory removed at start, re-joining after control
//! restarts, a clean SIGTERM, and a refusal to start without credentials or a token.
//! Sandboxes that really run are covered by `worker_in_host_vm.rs`.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Proc, ROOST, WAIT, admin_token, bearer, control_command, http, start_control};

fn start_control_on(data_dir: &Path, channel_port: u16) -> (Proc, SocketAddr) {
    start_control(control_command(data_dir, channel_port).args([
        "--heartbeat-interval",
        "200ms",
        "--host-lost-after",
        "30s",
    ]))
}

struct WorkerDirs<'a> {
    data: &'a Path,
    runtime: &'a Path,
    cache: &'a Path,
    snapshot: &'a Path,
}

fn worker_command(dirs: &WorkerDirs<'_>, api: Option<SocketAddr>, token: Option<&str>) -> Command {
    let mut command = Command::new(ROOST);
    command
        .args(["serve", "worker", "--data-dir"])
        .arg(dirs.data)
        .arg("--runtime-root")
        .arg(dirs.runtime)
        .arg("--template-dir")
        .arg(format!("base={}", dirs.snapshot.display()))
        .args(["--max-sandboxes", "5", "--max-backoff", "1s"])
        .env("ROOST_CACHE_DIR", dirs.cache)
        .env_remove("ROOST_DATA_DIR")
        .env_remove("ROOST_WORKER_TOKEN");
    if let Some(api) = api {
        command.arg("--control-url").arg(format!("http://{api}"));
    }
    if let Some(token) = token {
        command.env("ROOST_WORKER_TOKEN", token);
    }
    command
}

/// The host list once `worker_id` is ready (bounded).
fn ready_host(api: SocketAddr, admin: &str, worker_id: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, hosts) = http(api, "GET", "/v1/admin/hosts", &bearer(admin), None);
        assert_eq!(status, 200, "{hosts}");
        if let Some(host) = hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["id"] == worker_id && h["state"] == "ready")
        {
            return host.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{worker_id} never ready: {hosts}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn worker_id_of(joined_line: &str) -> String {
    joined_line
        .split(" as ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_owned()
}

#[test]
fn serve_worker_registers_joins_refuses_cleanly_rejoins_and_restarts_with_its_credentials() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let snapshot = r.join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    std::fs::write(snapshot.join("vm.state"), b"not a state file").unwrap();
    let runtime = r.join("run");
    // What a crashed worker left behind.
    std::fs::create_dir_all(runtime.join("cl-stale")).unwrap();
    std::fs::write(runtime.join("cl-stale/serial.log"), b"old").unwrap();
    let dirs = WorkerDirs {
        data: &r.join("worker"),
        runtime: &runtime,
        cache: &r.join("cache"),
        snapshot: &snapshot,
    };
    let channel_port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut control, api) = start_control_on(&r.join("control"), channel_port);
    let admin = admin_token(api);

    // Without credentials and without a token the worker cannot start.
    let out = worker_command(&dirs, Some(api), None).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--token"), "{stderr}");

    let (status, token) = http(
        api,
        "POST",
        "/v1/admin/workers/registration-tokens",
        &bearer(&admin),
        Some(json!({"name": "rack-7"})),
    );
    assert_eq!(status, 201, "{token}");
    let mut worker = Proc::spawn(&mut worker_command(
        &dirs,
        Some(api),
        token["token"].as_str(),
    ));
    let registered = worker.wait_line("roost worker: registered as ");
    let joined = worker.wait_line("roost worker: joined control at ");
    let worker_id = worker_id_of(&joined);
    assert!(registered.ends_with(&worker_id), "{registered} / {joined}");
    let creds = dirs.data.join("worker-credentials.json");
    let mode = std::fs::metadata(&creds).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "credentials are private");
    assert!(
        !runtime.join("cl-stale").exists(),
        "stale runtime directory removed at start"
    );

    let host = ready_host(api, &admin, &worker_id);
    assert_eq!(host["name"], "rack-7");
    assert_eq!(host["templates"], json!(["base"]));
    assert_eq!(host["maxSandboxes"], 5);

    // A tenant's create lands on this worker, whose VMM refuses the snapshot.
    let (status, user) = http(
        api,
        "POST",
        "/v1/auth/signup",
        "",
        Some(json!({"email": "dev@example.com", "password": "password123"})),
    );
    assert_eq!(status, 201, "{user}");
    let (status, key) = http(
        api,
        "POST",
        &format!("/v1/teams/{}/api-keys", user["teamId"].as_str().unwrap()),
        &bearer(user["token"].as_str().unwrap()),
        Some(json!({"name": "ci"})),
    );
    assert_eq!(status, 201, "{key}");
    let key = format!("x-api-key: {}\r\n", key["key"].as_str().unwrap());
    let (status, body) = http(
        api,
        "POST",
        "/v2/sandboxes",
        &key,
        Some(json!({"templateID": "base"})),
    );
    assert_eq!(status, 502, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("cannot create sandbox"), "{message}");
    assert!(
        message.contains("cannot restore"),
        "the VMM's reason: {message}"
    );
    assert_eq!(
        std::fs::read_dir(&runtime).unwrap().count(),
        0,
        "nothing left in the runtime root"
    );
    let (status, body) = http(
        api,
        "POST",
        "/v2/sandboxes",
        &key,
        Some(json!({"templateID": "code-interpreter"})),
    );
    assert!(status >= 400, "not offered here: {status} {body}");

    // Control restarts on the same data dir and channel port: the worker re-joins.
    assert!(control.terminate().success(), "{}", control.output());
    worker.wait_line("roost worker: lost control");
    drop(control);
    let (control, api) = start_control_on(&r.join("control"), channel_port);
    let rejoined = worker.wait_line("roost worker: joined control at ");
    assert_eq!(worker_id_of(&rejoined), worker_id);
    ready_host(api, &admin_token(api), &worker_id);

    // SIGTERM: a clean exit; a restart needs no token and keeps the worker's id.
    let status = worker.terminate();
    assert!(status.success(), "{status}\n{}", worker.output());
    assert_eq!(
        worker.stdout.last().map(String::as_str),
        Some("roost worker: stopped")
    );
    let mut again = Proc::spawn(&mut worker_command(&dirs, None, None));
    let joined = again.wait_line("roost worker: joined control at ");
    assert_eq!(worker_id_of(&joined), worker_id, "same identity");
    assert!(again.terminate().success(), "{}", again.output());
    drop(control);
}
