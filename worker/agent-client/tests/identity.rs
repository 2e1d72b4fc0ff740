//! The identity operation against the real `roost-agent` binary run as ordinary processes, as
//! PID 1 runs them in a VM: envd (`serve` with its private init socket), the code interpreter
//! (`interpreter` with its admin socket) and the channel, the latter inside a new UTS namespace
//! (`unshare --uts`, as root) so that it may set a hostname without touching this machine's.
//! The channel is allowed hostname and entropy (`--apply-identity hostname,entropy`); the
//! wall clock is machine-wide, so setting it is checked inside the host VM instead
//! (worker/cli/tests/templates_in_host_vm.rs).
//!
//! Needs root and util-linux's unshare; without them the test fails saying so.

mod common;

use std::io::{BufRead, BufReader};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent_binary;
use roost_agent_client::{
    AgentClient, Connector, Error, ErrorKind, IdentityRequest, ReadyListener, exec_argv,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A process killed and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for(what: &str, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready().await {
        assert!(Instant::now() < deadline, "{what} did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET path` on `127.0.0.1:port`: status and body.
async fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let token_header = token.map_or(String::new(), |t| format!("X-Access-Token: {t}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{token_header}Connection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut response))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

/// envd, the interpreter and the channel of one "guest".
struct Guest {
    client: AgentClient,
    envd_port: u16,
    interpreter_port: u16,
    _processes: Vec<Running>,
    _dir: tempfile::TempDir,
}

impl Guest {
    async fn start(with_envd: bool) -> Self {
        require_root_and_unshare();
        let dir = tempfile::tempdir().unwrap();
        let envd_init = dir.path().join("envd-init.sock");
        let admin = dir.path().join("interpreter-admin.sock");
        let mut processes = Vec::new();

        let envd_port = free_port();
        if with_envd {
            processes.push(Running(
                Command::new(agent_binary())
                    .args(["serve", "--listen", "127.0.0.1", "--port"])
                    .arg(envd_port.to_string())
                    .arg("--root")
                    .arg(dir.path())
                    .arg("--init-socket")
                    .arg(&envd_init)
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("spawn roost-agent serve"),
            ));
            wait_for("envd", async || {
                envd_init.exists() && TcpStream::connect(("127.0.0.1", envd_port)).await.is_ok()
            })
            .await;
        }

        // The interpreter never starts a kernel here: only its token check is exercised.
        let mut interpreter = Command::new(agent_binary())
            .args(["interpreter", "--listen", "127.0.0.1", "--port", "0"])
            .args([
                "--envd",
                "none",
                "--user",
                "root",
                "--python",
                "/nonexistent/python",
            ])
            .arg("--runtime-dir")
            .arg(dir.path().join("kernels"))
            .arg("--admin-socket")
            .arg(&admin)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn roost-agent interpreter");
        let mut line = String::new();
        BufReader::new(interpreter.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let interpreter_port: u16 = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no listening line: {line:?}"));
        processes.push(Running(interpreter));
        assert!(admin.exists(), "the admin socket is bound before the port");

        let socket = dir.path().join("agent.sock");
        let ready = ReadyListener::bind(dir.path().join("ready.sock")).unwrap();
        processes.push(Running(
            Command::new("unshare")
                .args(["--uts", "--fork", "--kill-child", "--"])
                .arg(agent_binary())
                .arg("channel")
                .arg("--listen-unix")
                .arg(&socket)
                .arg("--announce-unix")
                .arg(ready.path())
                .arg("--envd-init-socket")
                .arg(&envd_init)
                .arg("--interpreter-admin-socket")
                .arg(&admin)
                .args(["--apply-identity", "hostname,entropy"])
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn unshare roost-agent channel"),
        ));
        ready
            .accept_hello(Duration::from_secs(20))
            .await
            .expect("the channel announces itself");
        Self {
            client: AgentClient::new(Connector::Unix(socket)),
            envd_port,
            interpreter_port,
            _processes: processes,
            _dir: dir,
        }
    }

    async fn hostname(&self) -> String {
        let output = self.client.run(exec_argv(["hostname"])).await.unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

fn require_root_and_unshare() {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    });
    let unshare = Command::new("unshare")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        root && unshare,
        "this test needs root and util-linux's unshare (root: {root}, unshare: {unshare})"
    );
}

fn identity(hostname: &str, token: &str) -> IdentityRequest {
    let mut request = IdentityRequest::new("sb-clone-7", hostname).unwrap();
    request
        .env_vars
        .insert("GREETING".into(), "hello clone".into());
    request.access_token = Some(token.into());
    request
}

#[tokio::test]
async fn identity_sets_hostname_entropy_env_and_tokens() {
    let guest = Guest::start(true).await;
    assert_ne!(guest.hostname().await, "clone-7");
    assert_eq!(
        get(guest.envd_port, "/envs", None).await.0,
        200,
        "open before"
    );
    assert_eq!(get(guest.interpreter_port, "/contexts", None).await.0, 200);

    let applied = guest
        .client
        .set_identity(&identity("clone-7", "tok-7"))
        .await
        .unwrap();
    assert!(applied.hostname && applied.entropy, "{applied:?}");
    assert!(applied.envd && applied.interpreter, "{applied:?}");
    assert!(!applied.clock, "not allowed here: {applied:?}");
    assert_eq!(applied.clock_step_ns, 0);

    assert_eq!(guest.hostname().await, "clone-7");
    assert_eq!(guest.client.hello().await.unwrap().hostname, "clone-7");

    let (status, _) = get(guest.envd_port, "/envs", None).await;
    assert_eq!(status, 401, "envd now requires the token");
    let (status, body) = get(guest.envd_port, "/envs", Some("tok-7")).await;
    assert_eq!(status, 200, "{body}");
    let envs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(envs["GREETING"], "hello clone", "{body}");

    assert_eq!(get(guest.interpreter_port, "/contexts", None).await.0, 401);
    let wrong = get(guest.interpreter_port, "/contexts", Some("tok-6")).await;
    assert_eq!(wrong.0, 401, "the interpreter checks the new token");
    let right = get(guest.interpreter_port, "/contexts", Some("tok-7")).await;
    assert_eq!(right.0, 200, "{}", right.1);
    assert_eq!(get(guest.interpreter_port, "/health", None).await.0, 200);

    // A second identity replaces the first (a pooled clone handed to another sandbox).
    guest
        .client
        .set_identity(&identity("clone-8", "tok-8"))
        .await
        .unwrap();
    assert_eq!(guest.hostname().await, "clone-8");
    assert_eq!(get(guest.envd_port, "/envs", Some("tok-7")).await.0, 401);
    assert_eq!(
        get(guest.interpreter_port, "/contexts", Some("tok-8"))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn bad_identities_are_refused_and_change_nothing() {
    let guest = Guest::start(true).await;
    guest
        .client
        .set_identity(&identity("clone-1", "tok-1"))
        .await
        .unwrap();
    let mut short_entropy = identity("clone-2", "tok-2");
    short_entropy.entropy.truncate(16);
    let mut stale_clock = identity("clone-2", "tok-2");
    stale_clock.wall_clock_unix_ns = 0;
    let mut bad_env = identity("clone-2", "tok-2");
    bad_env.env_vars.insert("A=B".into(), "x".into());
    let mut bad_id = identity("clone-2", "tok-2");
    bad_id.sandbox_id = "../etc".into();
    for (request, expected) in [
        (identity("bad_host", "tok-2"), "hostname \"bad_host\""),
        (identity("clone-2", "tok\n2"), "access_token"),
        (short_entropy, "16 bytes given"),
        (stale_clock, "before 2020"),
        (bad_env, "env_vars"),
        (bad_id, "sandbox_id"),
    ] {
        let error = guest.client.set_identity(&request).await.unwrap_err();
        let Error::Agent(reply) = &error else {
            panic!("{error}")
        };
        assert_eq!(reply.kind, ErrorKind::BadRequest, "{error}");
        assert!(reply.message.contains(expected), "{expected}: {error}");
    }
    assert_eq!(guest.hostname().await, "clone-1", "unchanged");
    assert_eq!(get(guest.envd_port, "/envs", Some("tok-1")).await.0, 200);
    assert_eq!(
        get(guest.interpreter_port, "/contexts", Some("tok-1"))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn without_envd_the_identity_fails_naming_the_socket() {
    let guest = Guest::start(false).await;
    let error = guest
        .client
        .set_identity(&identity("clone-3", "tok-3"))
        .await
        .unwrap_err();
    assert_eq!(error.agent_kind(), Some(ErrorKind::NotFound), "{error}");
    assert!(error.to_string().contains("envd-init.sock"), "{error}");
    // The interpreter never got the token: the failure stopped before it.
    assert_eq!(get(guest.interpreter_port, "/contexts", None).await.0, 200);
}
