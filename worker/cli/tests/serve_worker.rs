//! `roost serve worker` against a real `roost serve control`, without KVM: the worker offers a
//! template whose snapshot directory holds a state file the VMM refuses, so everything but a
//! running VM is exercised on the real binaries — registration with a token, credentials kept
//! 0600 and reused by a restart without a token, the host and its templates as control sees
//! them, a create that fails cleanly (control answers with the VMM's reason; nothing is left in
//! the runtime root), a stale runtime directory removed at start, re-joining after control
//! restarts, a clean SIGTERM, and a refusal to start without credentials or a token.
//! Sandboxes that really run are covered by `worker_in_host_vm.rs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ROOST: &str = env!("CARGO_BIN_EXE_roost");
const ADMIN_EMAIL: &str = "ops@example.com";
const ADMIN_PASSWORD: &str = "correct-horse-battery";
const WAIT: Duration = Duration::from_secs(90);

/// A child `roost` process with its stdout lines and stderr text.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn roost");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
        }
    }

    /// The next stdout line starting with `prefix` (within [`WAIT`]); panics with the output.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("roost ended before printing {prefix:?}\n{}", self.output())
                }
            }
            if Instant::now() >= deadline {
                panic!("no {prefix:?} within {WAIT:?}\n{}", self.output());
            }
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// SIGTERM, then the exit status (within [`WAIT`]).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect what is left on stdout.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.stdout.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_control(data_dir: &Path, channel_port: u16) -> (Proc, SocketAddr) {
    let mut control = Proc::spawn(
        Command::new(ROOST)
            .args(["serve", "control", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--channel-listen", &format!("127.0.0.1:{channel_port}")])
            .args(["--heartbeat-interval", "200ms", "--host-lost-after", "30s"])
            .args(["--bootstrap-admin", ADMIN_EMAIL])
            .env("ROOST_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env_remove("ROOST_DATABASE_URL")
            .env_remove("ROOST_REDIS_URL"),
    );
    let line = control.wait_line("roost control: REST API on http://");
    let api = line
        .trim_start_matches("roost control: REST API on http://")
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (control, api)
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

/// One HTTP/1.1 exchange (`Connection: close`): status and JSON body (Null if none).
fn http(
    api: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(api).expect("connect to control");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {api}\r\nconnection: close\r\n{auth}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}\r\n")
}

fn admin_token(api: SocketAddr) -> String {
    let (status, login) = http(
        api,
        "POST",
        "/v1/auth/login",
        "",
        Some(json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})),
    );
    assert_eq!(status, 200, "{login}");
    login["token"].as_str().unwrap().to_owned()
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
    let (mut control, api) = start_control(&r.join("control"), channel_port);
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
    let (control, api) = start_control(&r.join("control"), channel_port);
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
