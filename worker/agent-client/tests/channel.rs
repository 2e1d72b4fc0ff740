//! The client against the real agent (`roost-agent channel --listen-unix`, an ordinary
//! process): every operation, the protocol's error paths, and that nothing leaks.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Agent, wait_until};
use roost_agent_client::{
    Error, ErrorKind, ExecEvent, UserSpec, WriteFileRequest, exec_argv, exec_shell,
};
use roost_proto::agent::PROTOCOL_VERSION;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const MIB: usize = 1024 * 1024;

fn assert_agent_error(result: Result<impl std::fmt::Debug, Error>, kind: ErrorKind) -> String {
    match result {
        Err(Error::Agent(reply)) if reply.kind == kind => reply.message,
        other => panic!("expected an agent error of kind {kind:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn announces_hello_on_start_and_answers_hello_and_health() {
    let agent = Agent::start().await;
    assert_eq!(agent.hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(agent.hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(agent.client.hello().await.unwrap(), agent.hello);
    let health = agent.client.health().await.unwrap();
    assert!(health.uptime_secs > 0.0, "{health:?}");
    assert!(health.memory.total_kib >= health.memory.available_kib && health.memory.total_kib > 0);
    assert!(health.tasks > 0);
    agent.assert_clean().await;
}

#[tokio::test]
async fn echo_exit_codes_signals_env_and_cwd() {
    let agent = Agent::start().await;
    let output = agent
        .client
        .run(exec_argv(["echo", "hello", "world"]))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"hello world\n");
    assert!(output.stderr.is_empty());
    assert!(output.status.success());

    let output = agent.client.run(exec_shell("exit 3")).await.unwrap();
    assert_eq!((output.status.code, output.status.signal), (Some(3), None));
    let output = agent.client.run(exec_shell("kill -TERM $$")).await.unwrap();
    assert_eq!((output.status.code, output.status.signal), (None, Some(15)));

    let mut request = exec_shell("echo \"$GREETING\"; pwd");
    request.env = BTreeMap::from([("GREETING".to_owned(), "hi there".to_owned())]);
    request.cwd = Some(agent.dir.path().to_str().unwrap().to_owned());
    let output = agent.client.run(request).await.unwrap();
    let expected = format!("hi there\n{}\n", agent.dir.path().display());
    assert_eq!(String::from_utf8_lossy(&output.stdout), expected);

    let mut request = exec_shell("echo \"[$HOME]\"; env | wc -l");
    request.clear_env = true;
    let output = agent.client.run(request).await.unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.starts_with("[]\n"), "{text:?}");

    let message = assert_agent_error(
        agent.client.exec(exec_argv(["/nonexistent/program"])).await,
        ErrorKind::SpawnFailed,
    );
    assert!(message.contains("/nonexistent/program"), "{message}");
    let mut request = exec_argv(["true"]);
    request.cwd = Some("/nonexistent-dir".into());
    assert_agent_error(agent.client.exec(request).await, ErrorKind::NotFound);
    assert_agent_error(
        agent.client.exec(exec_argv(Vec::<String>::new())).await,
        ErrorKind::BadRequest,
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn runs_as_another_user_with_its_home() {
    let agent = Agent::start().await;
    // nobody (65534) exists in Debian's /etc/passwd with HOME /nonexistent.
    let mut request = exec_shell("id -u; id -g; id -G; echo $HOME $USER");
    request.user = Some(UserSpec {
        uid: 65534,
        gid: 65534,
    });
    let output = agent.client.run(request).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "65534\n65534\n65534\n/nonexistent nobody\n",
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Supplementary groups come from /etc/group, as `id -G NAME` reports them here.
    let (name, uid, gid) = user_with_supplementary_groups();
    let expected = command_stdout("id", &["-G", &name]);
    let mut request = exec_argv(["id", "-G"]);
    request.user = Some(UserSpec { uid, gid });
    let output = agent.client.run(request).await.unwrap();
    let mut got: Vec<&str> = std::str::from_utf8(&output.stdout)
        .unwrap()
        .split_whitespace()
        .collect();
    let mut want: Vec<&str> = expected.split_whitespace().collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "groups of {name}");

    // The working directory is entered as the user: a root-only one is refused.
    let private = agent.dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let mut request = exec_argv(["true"]);
    request.user = Some(UserSpec {
        uid: 65534,
        gid: 65534,
    });
    request.cwd = Some(private.to_str().unwrap().to_owned());
    let message = assert_agent_error(agent.client.exec(request).await, ErrorKind::SpawnFailed);
    assert!(message.contains("ermission denied"), "{message}");
    agent.assert_clean().await;
}

fn command_stdout(program: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{program} {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// A user of this machine that is a member of some group besides its own (Debian's
/// `postgres`, in `ssl-cert`, on CI), as (name, uid, gid).
fn user_with_supplementary_groups() -> (String, u32, u32) {
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    let member = groups
        .lines()
        .filter_map(|line| line.split(':').nth(3))
        .flat_map(|members| members.split(','))
        .find(|name| {
            !name.is_empty()
                && std::process::Command::new("id")
                    .arg(name)
                    .output()
                    .is_ok_and(|o| o.status.success())
        })
        .expect("this test needs a user with a supplementary group in /etc/group (e.g. postgres)")
        .to_owned();
    let uid = command_stdout("id", &["-u", &member]).parse().unwrap();
    let gid = command_stdout("id", &["-g", &member]).parse().unwrap();
    (member, uid, gid)
}

#[tokio::test]
async fn stdin_round_trip_with_backpressure() {
    let agent = Agent::start().await;
    let mut request = exec_argv(["cat"]);
    request.stdin = true;
    let mut exec = agent.client.exec(request).await.unwrap();
    exec.write_stdin(b"line one\nline two\n").await.unwrap();
    exec.close_stdin().await.unwrap();
    let output = exec.output().await.unwrap();
    assert_eq!(output.stdout, b"line one\nline two\n");
    assert!(output.status.success());

    // 8 MiB through `cat` while reading its output concurrently: both directions must flow.
    let data: Vec<u8> = (0..8 * MIB)
        .map(|i| u8::try_from(i * 31 % 251).unwrap())
        .collect();
    let mut request = exec_argv(["cat"]);
    request.stdin = true;
    let (mut input, output) = agent.client.exec(request).await.unwrap().split();
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            input.write_stdin(&data).await.unwrap();
            input.close_stdin().await.unwrap();
            input
        })
    };
    let output = output.collect().await.unwrap();
    drop(writer.await.unwrap());
    assert_eq!(output.stdout.len(), data.len());
    assert!(output.stdout == data, "stdin came back changed");

    // Stdin sent to a process that does not read it must not hang the exec.
    let mut request = exec_shell("exec 0<&-; echo done");
    request.stdin = true;
    let mut exec = agent.client.exec(request).await.unwrap();
    let _ = exec.write_stdin(&vec![b'x'; 2 * MIB]).await;
    let output = tokio::time::timeout(Duration::from_secs(20), exec.output())
        .await
        .expect("exec finished")
        .unwrap();
    assert_eq!(output.stdout, b"done\n");
    agent.assert_clean().await;
}

#[tokio::test]
async fn sixteen_mib_of_output_arrive_intact_and_stderr_stays_separate() {
    let agent = Agent::start().await;
    let file = agent.dir.path().join("random");
    let script = format!(
        "head -c {} /dev/urandom > {f}; sha256sum < {f} | cut -d' ' -f1 >&2; cat {f}",
        16 * MIB,
        f = file.display()
    );
    let output = agent.client.run(exec_shell(script)).await.unwrap();
    assert!(output.status.success());
    assert_eq!(output.stdout.len(), 16 * MIB);
    let expected = String::from_utf8(output.stderr).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&output.stdout)), expected.trim());

    let output = agent
        .client
        .run(exec_shell(
            "echo out1; echo err1 >&2; echo out2; echo err2 >&2",
        ))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"out1\nout2\n");
    assert_eq!(output.stderr, b"err1\nerr2\n");
    agent.assert_clean().await;
}

#[tokio::test]
async fn kill_signal_and_dropped_connections_end_the_whole_process_group() {
    let agent = Agent::start().await;
    // A shell with a background child: SIGKILL must reach both.
    let mut exec = agent
        .client
        .exec(exec_shell("sleep 300 & echo started; wait"))
        .await
        .unwrap();
    let pid = exec.pid();
    assert_eq!(
        exec.next_event().await.unwrap(),
        Some(ExecEvent::Stdout("started\n".into()))
    );
    assert!(group_members(pid).len() >= 2, "shell and sleep");
    exec.kill().await.unwrap();
    let output = exec.output().await.unwrap();
    assert_eq!(output.status.signal, Some(9));
    assert!(
        wait_until(Duration::from_secs(5), || group_members(pid).is_empty()).await,
        "process group {pid} survived: {:?}",
        group_members(pid)
    );

    // Any signal number goes to the group; an unknown one is a bad request.
    let mut exec = agent
        .client
        .exec(exec_argv(["sleep", "300"]))
        .await
        .unwrap();
    exec.signal(15).await.unwrap();
    assert_eq!(exec.output().await.unwrap().status.signal, Some(15));
    let mut exec = agent
        .client
        .exec(exec_argv(["sleep", "300"]))
        .await
        .unwrap();
    let pid = exec.pid();
    exec.signal(12345).await.unwrap();
    assert_agent_error(exec.output().await, ErrorKind::BadRequest);
    assert!(wait_until(Duration::from_secs(5), || group_members(pid).is_empty()).await);

    // Dropping the handle closes the connection: the agent kills the group.
    let exec = agent
        .client
        .exec(exec_shell("sleep 300 & sleep 300"))
        .await
        .unwrap();
    let pid = exec.pid();
    let sleeps = |pgid| {
        group_members(pgid)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c == "sleep\n")
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(5), || sleeps(pid) == 2).await,
        "expected the shell's two sleeps in group {pid}: {:?}",
        group_members(pid)
    );
    drop(exec);
    assert!(
        wait_until(Duration::from_secs(5), || group_members(pid).is_empty()).await,
        "dropping the exec left {:?}",
        group_members(pid)
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn fifty_mib_file_write_then_read_by_sha256() {
    let agent = Agent::start().await;
    let source = agent.dir.path().join("source");
    let mut data = vec![0u8; 50 * MIB];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    }
    std::fs::write(&source, &data).unwrap();
    let expected = hex::encode(Sha256::digest(&data));
    drop(data);

    let target = agent.dir.path().join("new/dirs/copy");
    let mut from = tokio::fs::File::open(&source).await.unwrap();
    let request = WriteFileRequest {
        path: target.to_str().unwrap().to_owned(),
        mode: Some(0o600),
        create_dirs: true,
        owner: None,
    };
    let written = agent.client.write_file(request, &mut from).await.unwrap();
    assert_eq!(written, 50 * MIB as u64);
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.len(), 50 * MIB as u64);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );

    let mut download = agent
        .client
        .read_file(target.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!((download.size, download.mode), (50 * MIB as u64, 0o600));
    let mut hasher = Sha256::new();
    let mut largest_chunk = 0;
    while let Some(chunk) = download.next_chunk().await.unwrap() {
        largest_chunk = largest_chunk.max(chunk.len());
        hasher.update(&chunk);
    }
    assert_eq!(download.received(), 50 * MIB as u64);
    assert_eq!(hex::encode(hasher.finalize()), expected);
    assert!(largest_chunk <= roost_proto::agent::MAX_CHUNK_LEN);

    // Overwriting truncates; an empty file round-trips.
    let request = WriteFileRequest {
        path: target.to_str().unwrap().to_owned(),
        mode: None,
        create_dirs: false,
        owner: Some(UserSpec {
            uid: 65534,
            gid: 65534,
        }),
    };
    assert_eq!(
        agent
            .client
            .write_file(request, &mut &b""[..])
            .await
            .unwrap(),
        0
    );
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.len(), 0);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
    let mut copy = Vec::new();
    let n = agent
        .client
        .read_file_into(target.to_str().unwrap(), &mut copy)
        .await
        .unwrap();
    assert_eq!((n, copy.len()), (0, 0));
    agent.assert_clean().await;
}

#[tokio::test]
async fn file_errors_are_clear() {
    let agent = Agent::start().await;
    let dir = agent.dir.path();
    let missing = dir.join("missing.txt");
    let message = assert_agent_error(
        agent.client.read_file(missing.to_str().unwrap()).await,
        ErrorKind::NotFound,
    );
    assert!(message.contains("missing.txt"), "{message}");
    assert_agent_error(
        agent.client.read_file(dir.to_str().unwrap()).await,
        ErrorKind::IsADirectory,
    );
    assert_agent_error(
        agent.client.read_file("relative/path").await,
        ErrorKind::BadRequest,
    );

    let write = |path: &std::path::Path, create_dirs| WriteFileRequest {
        path: path.to_str().unwrap().to_owned(),
        mode: None,
        create_dirs,
        owner: None,
    };
    let message = assert_agent_error(
        agent
            .client
            .write_file(write(&dir.join("no/such/dir/f"), false), &mut &b"x"[..])
            .await,
        ErrorKind::NotFound,
    );
    assert!(message.contains("create_dirs"), "{message}");
    assert_agent_error(
        agent
            .client
            .write_file(write(dir, false), &mut &b"x"[..])
            .await,
        ErrorKind::IsADirectory,
    );
    std::fs::write(dir.join("plain"), b"").unwrap();
    assert_agent_error(
        agent
            .client
            .write_file(write(&dir.join("plain/below"), true), &mut &b"x"[..])
            .await,
        ErrorKind::NotADirectory,
    );
    // Permissions: a read-only file system (procfs) refuses writes.
    let error = agent
        .client
        .write_file(
            write(std::path::Path::new("/proc/version"), false),
            &mut &b"x"[..],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.agent_kind(),
            Some(ErrorKind::PermissionDenied | ErrorKind::Io)
        ),
        "{error:?}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_write_blocked_on_a_fifo_does_not_stall_other_operations() {
    let agent = Agent::start().await;
    let fifo = agent.dir.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let request = WriteFileRequest {
        path: fifo.to_str().unwrap().to_owned(),
        mode: None,
        create_dirs: false,
        owner: None,
    };
    let client = agent.client.clone();
    let write = tokio::spawn(async move { client.write_file(request, &mut &b"through"[..]).await });
    // Opening a FIFO for writing blocks until a reader comes; meanwhile the agent answers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hello = tokio::time::timeout(Duration::from_secs(5), agent.client.hello()).await;
    assert!(matches!(hello, Ok(Ok(_))), "{hello:?}");
    assert!(!write.is_finished());
    let read = tokio::task::spawn_blocking(move || std::fs::read(fifo).unwrap());
    assert_eq!(write.await.unwrap().unwrap(), 7);
    assert_eq!(read.await.unwrap(), b"through");
    agent.assert_clean().await;
}

/// A free TCP port on 127.0.0.1 (free when asked; the test binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn http_get_through_a_port_forward() {
    let agent = Agent::start().await;
    let site = agent.dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("hello.txt"), b"hello from the guest\n").unwrap();
    let port = free_port();
    // The server runs through the agent, as it would inside a VM.
    let server = agent
        .client
        .exec(exec_argv([
            "python3",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
            site.to_str().unwrap(),
        ]))
        .await
        .unwrap();

    let mut stream = None;
    for _ in 0..200 {
        match agent.client.forward_port(port).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) if e.agent_kind() == Some(ErrorKind::ConnectionRefused) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let mut stream = stream.expect("the HTTP server came up");
    let response = http_get(&mut stream, "/hello.txt").await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(
        response.ends_with("\r\n\r\nhello from the guest\n"),
        "{response}"
    );
    drop(stream);

    // The same through a local TCP listener.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let forwarder = agent.client.serve_forward(listener, port);
    for _ in 0..3 {
        let mut tcp = tokio::net::TcpStream::connect(local).await.unwrap();
        let response = http_get(&mut tcp, "/hello.txt").await;
        assert!(response.ends_with("hello from the guest\n"), "{response}");
    }
    forwarder.abort();
    let _ = forwarder.await;
    drop(server); // kills the server
    agent.assert_clean().await;
}

async fn http_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .expect("the response ends")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn forward_to_a_closed_port_is_a_clear_error() {
    let agent = Agent::start().await;
    let port = free_port();
    let message = assert_agent_error(
        agent.client.forward_port(port).await,
        ErrorKind::ConnectionRefused,
    );
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert_agent_error(agent.client.forward_port(0).await, ErrorKind::BadRequest);
    agent.assert_clean().await;
}

/// Sends raw bytes as a connection's start and returns the agent's answer (until it closes).
async fn raw_exchange(agent: &Agent, bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(&agent.socket).await.unwrap();
    // The agent may close before reading everything (oversized frames): ignore write errors.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the agent answers and closes")
        .unwrap();
    answer
}

/// The error kind in an answer that is a single error frame.
fn error_kind_of(answer: &[u8]) -> String {
    assert!(answer.len() > 5, "no error frame: {answer:?}");
    let len = u32::from_be_bytes(answer[..4].try_into().unwrap()) as usize;
    assert_eq!(answer.len(), 4 + len, "one frame expected: {answer:?}");
    assert_eq!(answer[4], 0, "a control message");
    let message: serde_json::Value = serde_json::from_slice(&answer[5..]).unwrap();
    assert_eq!(message["type"], "error", "{message}");
    message["kind"].as_str().unwrap().to_owned()
}

fn frame(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = u32::try_from(payload.len() + 1)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    bytes.push(tag);
    bytes.extend_from_slice(payload);
    bytes
}

#[tokio::test]
async fn malformed_and_oversized_frames_get_errors_not_crashes() {
    let mut agent = Agent::start().await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad json", frame(0, b"{not json"), "bad_request"),
        (
            "unknown op",
            frame(0, br#"{"version":1,"op":"format_disk"}"#),
            "bad_request",
        ),
        ("unknown tag", frame(9, b"x"), "bad_request"),
        ("empty frame", vec![0, 0, 0, 0], "bad_request"),
        ("data first", frame(1, b"stdin?"), "bad_request"),
        (
            "future version",
            frame(0, br#"{"version":99,"op":"hello"}"#),
            "unsupported_version",
        ),
        (
            "oversized prefix",
            vec![0xff, 0xff, 0xff, 0xff, 0],
            "frame_too_large",
        ),
        (
            "oversized frame with its payload",
            {
                let mut bytes = frame(0, &vec![b' '; roost_proto::agent::MAX_FRAME_LEN + 10]);
                bytes.truncate(4 * MIB);
                bytes
            },
            "frame_too_large",
        ),
    ];
    for (name, bytes, kind) in cases {
        let answer = raw_exchange(&agent, &bytes).await;
        assert_eq!(error_kind_of(&answer), kind, "{name}");
        agent.assert_alive();
    }
    // A wrong message in the middle of an exec.
    let mut bytes = frame(
        0,
        &serde_json::to_vec(&roost_proto::agent::Request::new(
            roost_proto::agent::Operation::Exec(roost_agent_client::exec_argv(["sleep", "300"])),
        ))
        .unwrap(),
    );
    bytes.extend(frame(4, b"file data in an exec"));
    let answer = raw_exchange(&agent, &bytes).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains(r#""type":"started""#) && text.contains(r#""kind":"bad_request""#),
        "{text}"
    );
    // A connection that closes at once is just dropped; one that ends mid-frame is told so.
    assert!(raw_exchange(&agent, b"").await.is_empty());
    let answer = raw_exchange(&agent, &[0, 0, 0, 50, 0, b'{']).await;
    assert_eq!(error_kind_of(&answer), "bad_request");

    agent.assert_alive();
    assert_eq!(agent.client.hello().await.unwrap(), agent.hello);
    let output = agent
        .client
        .run(exec_argv(["echo", "still fine"]))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"still fine\n");
    agent.assert_clean().await;
}

#[tokio::test]
async fn many_concurrent_execs() {
    let agent = Agent::start().await;
    let runs = (0..32).map(|i| {
        let client = agent.client.clone();
        async move {
            client
                .run(exec_shell(format!("echo {i}; exit {}", i % 4)))
                .await
                .unwrap()
        }
    });
    let outputs = futures::future::join_all(runs).await;
    for (i, output) in outputs.into_iter().enumerate() {
        assert_eq!(output.stdout, format!("{i}\n").into_bytes());
        assert_eq!(output.status.code, Some(i32::try_from(i % 4).unwrap()));
    }
    agent.assert_clean().await;
}

/// Processes whose process group is `pgid` (zombies excluded).
fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Fields after the parenthesised command: state, ppid, pgrp, ...
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str())
        })
        .collect()
}
