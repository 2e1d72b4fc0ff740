//! What the CLI's integration tests that start real `roost serve ...` processes share: a child
//! process whose output is collected, a `roost serve control` on a temporary SQLite data
//! directory with a bootstrap admin, and a minimal blocking HTTP/1.1 client (the tests speak to
//! control and the gateway over plain HTTP, one request per connection).
//!
//! Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const ROOST: &str = env!("CARGO_BIN_EXE_roost");
pub const ADMIN_EMAIL: &str = "ops@example.com";
pub const ADMIN_PASSWORD: &str = "correct-horse-battery";
/// How long a process may take to print an expected line or to exit after SIGTERM.
pub const WAIT: Duration = Duration::from_secs(90);
/// The guest-side egress probe (Python, run in a sandbox): `name=host:port` tries a TCP
/// connection (sending an HTTP request, reading the first line back); `name=dns:host` resolves
/// a name. One `PROBE name outcome` line each: `reached:<first line>`, `refused`, `timeout`,
/// `resolved:<addr>` or `nodns`.
pub const EGRESS_PROBE: &str = r#"
import socket, sys
def conn(host, port):
    try:
        s = socket.create_connection((host, int(port)), timeout=8)
        s.settimeout(8)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return "reached:" + s.recv(200).decode(errors="replace").split("\r\n")[0].replace(" ", "_")
    except socket.timeout:
        return "timeout"
    except socket.gaierror:
        return "nodns"
    except OSError:
        return "refused"
for arg in sys.argv[1:]:
    name, target = arg.split("=", 1)
    if target.startswith("dns:"):
        try:
            out = "resolved:" + socket.gethostbyname(target[4:])
        except OSError:
            out = "nodns"
    else:
        host, port = target.rsplit(":", 1)
        out = conn(host, port)
    print("PROBE", name, out, flush=True)
"#;
/// What `roost serve control` prints once its REST API listens.
const CONTROL_READY: &str = "roost control: REST API on http://";

/// A child `roost` process with its stdout lines and stderr text; killed when dropped.
pub struct Proc {
    pub child: Child,
    /// In a mutex only so that a `&Proc` may be held across an `.await` in async tests.
    lines: Mutex<Receiver<String>>,
    /// The stdout lines read so far (by [`Proc::wait_line`] and [`Proc::terminate`]).
    pub stdout: Vec<String>,
    pub stderr: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(command: &mut Command) -> Self {
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
            lines: Mutex::new(lines),
            stdout: Vec::new(),
            stderr,
        }
    }

    /// The next stdout line starting with `prefix` (within [`WAIT`]); panics with the output.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        self.try_wait_line(prefix, WAIT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The next stdout line starting with `prefix`, or an error with the output when the
    /// process ends first (what a refused start looks like); panics after `within`.
    pub fn try_wait_line(&mut self, prefix: &str, within: Duration) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = self
                .lines
                .get_mut()
                .unwrap()
                .recv_timeout(left.min(Duration::from_millis(200)));
            match received {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait for roost");
                    // Let the stderr reader drain.
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(format!(
                        "roost exited with {status} before printing {prefix:?}\n{}",
                        self.output()
                    ));
                }
            }
            if Instant::now() >= deadline {
                panic!("no {prefix:?} within {within:?}\n{}", self.output());
            }
        }
    }

    /// Everything read so far, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// SIGTERM, then the exit status (within [`WAIT`]).
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_with(nix::sys::signal::Signal::SIGTERM, WAIT)
    }

    /// Sends `signal`, then the exit status; panics when there is none within `within`.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal, within: Duration) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect what is left on stdout.
                let lines = self.lines.get_mut().unwrap();
                while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
                    self.stdout.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {within:?} of {signal}\n{}",
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

/// `roost serve control` on SQLite in `data_dir` (REST on a free loopback port, the worker
/// channel on `channel_port`) with the bootstrap admin [`ADMIN_EMAIL`]; add arguments, then
/// [`start_control`] it.
pub fn control_command(data_dir: &Path, channel_port: u16) -> Command {
    let mut command = Command::new(ROOST);
    command
        .args(["serve", "control", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(["--channel-listen", &format!("127.0.0.1:{channel_port}")])
        .args(["--bootstrap-admin", ADMIN_EMAIL])
        .env("ROOST_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env_remove("ROOST_DATABASE_URL")
        .env_remove("ROOST_REDIS_URL");
    command
}

/// A control for a worker inside the host VM, which reaches this machine as 10.0.2.2: its
/// channel is announced there, heartbeats are every second; `extra` adds arguments. Returns
/// control, its REST address and a worker registration token.
pub fn start_control_for_host_vm(data_dir: &Path, extra: &[&str]) -> (Proc, SocketAddr, String) {
    let channel_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (control, api) = start_control(
        control_command(data_dir, channel_port)
            .args(["--channel-public-addr", &format!("10.0.2.2:{channel_port}")])
            .args(["--heartbeat-interval", "1s", "--host-lost-after", "60s"])
            .args(extra)
            .env("RUST_LOG", "info"),
    );
    let (status, token) = http(
        api,
        "POST",
        "/v1/admin/workers/registration-tokens",
        &bearer(&admin_token(api)),
        Some(json!({"name": "host-vm", "ttlSecs": 3600})),
    );
    assert_eq!(status, 201, "{token}");
    let token = token["token"].as_str().unwrap().to_owned();
    (control, api, token)
}

/// Starts control and waits for its REST address.
pub fn start_control(command: &mut Command) -> (Proc, SocketAddr) {
    try_start_control(command, WAIT).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts control and waits (at most `within`) for its REST address; the error holds its
/// output when it exits first (a refused configuration).
pub fn try_start_control(
    command: &mut Command,
    within: Duration,
) -> Result<(Proc, SocketAddr), String> {
    let mut control = Proc::spawn(command);
    let line = control.try_wait_line(CONTROL_READY, within)?;
    let api = line
        .trim_start_matches(CONTROL_READY)
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    Ok((control, api))
}

/// One HTTP/1.1 exchange (`Connection: close`): status and JSON body (Null if none).
pub fn http(
    api: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: Option<Value>,
) -> (u16, Value) {
    http_host(api, &api.to_string(), method, path, auth, body)
}

/// [`http`] with another `Host` header (the gateway routes on it).
pub fn http_host(
    api: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    auth: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(api).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n{auth}\
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
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// An `authorization: Bearer` header line for [`http`].
pub fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}\r\n")
}

/// The bootstrap admin's JWT.
pub fn admin_token(api: SocketAddr) -> String {
    try_admin_token(api).unwrap_or_else(|e| panic!("{e}"))
}

/// The bootstrap admin's JWT, or what control answered instead.
pub fn try_admin_token(api: SocketAddr) -> Result<String, String> {
    let (status, login) = http(
        api,
        "POST",
        "/v1/auth/login",
        "",
        Some(json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})),
    );
    match (status, login["token"].as_str()) {
        (200, Some(token)) => Ok(token.to_owned()),
        _ => Err(format!("admin login: {status} {login}")),
    }
}

/// The word a host-VM script polls for on the test's signal port (`wait` at first), and the
/// paths it asked for (how it says it reached a step).
#[derive(Debug, Default)]
pub struct Signal {
    phase: Mutex<String>,
    asked: Mutex<Vec<String>>,
}

impl Signal {
    pub fn set(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap() = phase.into();
    }

    /// Whether the script asked for `path`.
    pub fn asked(&self, path: &str) -> bool {
        self.asked.lock().unwrap().iter().any(|p| p == path)
    }

    /// Waits (bounded, or until `done`) for the script to ask for `path`.
    pub fn wait_for(
        &self,
        path: &str,
        within: Duration,
        done: &std::sync::atomic::AtomicBool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while !self.asked(path) {
            if Instant::now() >= deadline || done.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(format!("the script never reached {path}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

/// Serves `signal` on a free loopback port (the host VM reaches it as 10.0.2.2): every request
/// is answered with the current word and its path recorded.
pub fn signal_server(signal: Arc<Signal>) -> u16 {
    signal.set("wait");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            if let Some(path) = request.split_whitespace().nth(1) {
                signal.asked.lock().unwrap().push(path.to_owned());
            }
            let word = signal.phase.lock().unwrap().clone();
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{word}",
                word.len()
            );
        }
    });
    port
}

/// Signs `email` up and makes an API key for its team.
pub fn tenant_api_key(api: SocketAddr, email: &str) -> Result<String, String> {
    let (status, user) = http(
        api,
        "POST",
        "/v1/auth/signup",
        "",
        Some(json!({"email": email, "password": "password123"})),
    );
    if status != 201 {
        return Err(format!("signup: {status} {user}"));
    }
    let (status, key) = http(
        api,
        "POST",
        &format!(
            "/v1/teams/{}/api-keys",
            user["teamId"].as_str().unwrap_or_default()
        ),
        &bearer(user["token"].as_str().unwrap_or_default()),
        Some(json!({"name": "ci"})),
    );
    match key["key"].as_str() {
        Some(key) if status == 201 => Ok(key.to_owned()),
        _ => Err(format!("api key: {status} {key}")),
    }
}

/// Waits (bounded, or until `done`) for a ready worker offering `template`; its host entry.
pub fn wait_for_worker_offering(
    api: SocketAddr,
    template: &str,
    within: Duration,
    done: &std::sync::atomic::AtomicBool,
) -> Result<Value, String> {
    let admin = try_admin_token(api)?;
    let deadline = Instant::now() + within;
    loop {
        let (status, hosts) = http(api, "GET", "/v1/admin/hosts", &bearer(&admin), None);
        if status == 200
            && let Some(host) = hosts.as_array().and_then(|a| {
                a.iter().find(|h| {
                    h["state"] == "ready"
                        && h["templates"]
                            .as_array()
                            .is_some_and(|t| t.iter().any(|t| t == template))
                })
            })
        {
            return Ok(host.clone());
        }
        if Instant::now() >= deadline || done.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(format!(
                "no ready worker offering {template}; hosts: {hosts}"
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The last `max` bytes of `text` (at a character boundary).
pub fn tail(text: &str, max: usize) -> &str {
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}
