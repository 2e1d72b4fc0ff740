//! `POST /init` through the channel: the worker reaches envd's private init socket with a
//! forward to target `envd_init`, against the real `roost-agent` binary run as two ordinary
//! processes (`serve` for the envd API, `channel` for the worker's channel), as PID 1 runs
//! them inside a VM.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent_binary;
use roost_agent_client::{AgentClient, Connector, Error, ErrorKind, InitRequest, ReadyListener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// A process killed and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `roost-agent serve` on a free loopback port with its init socket at `init_socket`.
struct Envd {
    port: u16,
    _process: Running,
}

impl Envd {
    async fn start(init_socket: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = init_socket.parent().unwrap();
        let process = Running(
            Command::new(agent_binary())
                .args([
                    "serve",
                    "--listen",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                ])
                .arg("--root")
                .arg(root)
                .arg("--init-socket")
                .arg(init_socket)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn roost-agent serve"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(init_socket.exists() && TcpStream::connect(("127.0.0.1", port)).await.is_ok()) {
            assert!(
                Instant::now() < deadline,
                "roost-agent serve did not listen on :{port} and {}",
                init_socket.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            port,
            _process: process,
        }
    }

    /// `GET path` on envd's TCP port: status and body.
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let token_header = token.map_or(String::new(), |t| format!("X-Access-Token: {t}\r\n"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n{token_header}Connection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut response))
            .await
            .expect("envd answers within 10 s")
            .unwrap();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
            .to_owned();
        (status, body)
    }
}

/// `roost-agent channel --listen-unix … --envd-init-socket <init_socket>`.
struct Channel {
    client: AgentClient,
    socket: PathBuf,
    _process: Running,
}

impl Channel {
    async fn start(dir: &Path, init_socket: &Path) -> Self {
        let socket = dir.join("agent.sock");
        let ready = ReadyListener::bind(dir.join("ready.sock")).unwrap();
        let process = Running(
            Command::new(agent_binary())
                .arg("channel")
                .arg("--listen-unix")
                .arg(&socket)
                .arg("--announce-unix")
                .arg(ready.path())
                .arg("--envd-init-socket")
                .arg(init_socket)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn roost-agent channel"),
        );
        ready
            .accept_hello(Duration::from_secs(20))
            .await
            .expect("the channel announces itself");
        Self {
            client: AgentClient::new(Connector::Unix(socket.clone())),
            socket,
            _process: process,
        }
    }
}

#[tokio::test]
async fn init_through_the_channel_sets_env_vars_and_the_access_token() {
    let dir = tempfile::tempdir().unwrap();
    let init_socket = dir.path().join("envd-init.sock");
    let envd = Envd::start(&init_socket).await;
    let channel = Channel::start(dir.path(), &init_socket).await;

    // Before /init: no token required, no variable.
    let (status, body) = envd.get("/envs", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("ROOST_INIT_TEST"), "{body}");

    let request = InitRequest {
        sandbox_id: Some("sb-init-test".into()),
        env_vars: Some(BTreeMap::from([(
            "ROOST_INIT_TEST".into(),
            "through the channel".into(),
        )])),
        access_token: Some("s3cret".into()),
        ..InitRequest::default()
    };
    channel.client.init_sandbox(&request).await.unwrap();

    let (status, body) = envd.get("/envs", None).await;
    assert_eq!(status, 401, "no token after /init set one: {body}");
    let (status, body) = envd.get("/envs", Some("wrong")).await;
    assert_eq!(status, 401, "wrong token: {body}");
    let (status, body) = envd.get("/envs", Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    let envs: BTreeMap<String, String> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        envs.get("ROOST_INIT_TEST").map(String::as_str),
        Some("through the channel"),
        "{body}"
    );

    // envd's own refusal comes back with its status and reason.
    let bad = InitRequest {
        default_workdir: Some("relative/dir".into()),
        ..InitRequest::default()
    };
    match channel.client.init_sandbox(&bad).await {
        Err(Error::InitRejected { status: 400, body }) => {
            assert!(body.contains("absolute"), "{body}");
        }
        other => panic!("expected a 400 from envd, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_init_socket_is_not_found_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let init_socket = dir.path().join("no-envd-here.sock");
    let channel = Channel::start(dir.path(), &init_socket).await;
    let error = channel
        .client
        .init_sandbox(&InitRequest::default())
        .await
        .unwrap_err();
    assert_eq!(error.agent_kind(), Some(ErrorKind::NotFound), "{error}");
    let Error::Agent(reply) = &error else {
        panic!("{error:?}")
    };
    assert!(
        reply.message.contains("envd init socket")
            && reply.message.contains(&*init_socket.to_string_lossy()),
        "{}",
        reply.message
    );
    // The channel keeps serving.
    channel.client.hello().await.unwrap();
}

/// Sends one request frame and returns the agent's answer (it closes after an error).
async fn raw_request(socket: &Path, json: &str) -> String {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    let len = u32::try_from(json.len() + 1).unwrap();
    let mut frame = len.to_be_bytes().to_vec();
    frame.push(0);
    frame.extend_from_slice(json.as_bytes());
    stream.write_all(&frame).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the agent answers and closes within 10 s");
    // Skip the 5-byte frame head.
    String::from_utf8_lossy(answer.get(5..).unwrap_or_default()).into_owned()
}

#[tokio::test]
async fn unknown_targets_and_unknown_versions_get_clear_error_frames() {
    let dir = tempfile::tempdir().unwrap();
    let init_socket = dir.path().join("envd-init.sock");
    let _envd = Envd::start(&init_socket).await;
    let channel = Channel::start(dir.path(), &init_socket).await;

    // A path is not a target: only the configured init socket can be reached.
    let answer = raw_request(
        &channel.socket,
        r#"{"version":2,"op":"forward","target":"/run/roost/envd-init.sock"}"#,
    )
    .await;
    assert!(
        answer.contains(r#""kind":"bad_request""#)
            && answer.contains("unknown variant")
            && answer.contains("envd_init"),
        "{answer}"
    );
    // A port with the init target is refused rather than guessed at.
    let answer = raw_request(
        &channel.socket,
        r#"{"version":2,"op":"forward","target":"envd_init","port":49983}"#,
    )
    .await;
    assert!(
        answer.contains(r#""kind":"bad_request""#) && answer.contains("takes no `port`"),
        "{answer}"
    );
    // A version this agent does not speak (what a version 1 agent answers a version 2
    // request with, too).
    let answer = raw_request(
        &channel.socket,
        r#"{"version":99,"op":"forward","target":"envd_init"}"#,
    )
    .await;
    assert!(
        answer.contains(r#""kind":"unsupported_version""#) && answer.contains("99"),
        "{answer}"
    );
    // The real thing still works on the same agent.
    channel
        .client
        .init_sandbox(&InitRequest::default())
        .await
        .unwrap();
}
