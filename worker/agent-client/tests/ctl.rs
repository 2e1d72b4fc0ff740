//! `roost-agent-ctl` against the real agent: exit codes, streamed output, files through
//! stdin/stdout, and wait-ready.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Agent, agent_binary};

const CTL: &str = env!("CARGO_BIN_EXE_roost-agent-ctl");

fn ctl(agent: &Agent, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(CTL)
        .arg("--unix")
        .arg(&agent.socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn exec_files_and_hello_from_the_command_line() {
    let agent = Agent::start().await;
    let socket = agent.socket.clone();
    let agent = tokio::task::spawn_blocking(move || {
        let output = ctl(
            &agent,
            &["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 5"],
            b"",
        );
        assert_eq!(output.status.code(), Some(5));
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");

        let output = ctl(&agent, &["exec", "--", "sh", "-c", "kill -9 $$"], b"");
        assert_eq!(output.status.code(), Some(128 + 9));

        let output = ctl(
            &agent,
            &[
                "exec",
                "--stdin",
                "--env",
                "X=1",
                "--",
                "sh",
                "-c",
                "echo $X; cat",
            ],
            b"piped",
        );
        assert_eq!(output.stdout, b"1\npiped");

        let path = agent.dir.path().join("sub/file");
        let path = path.to_str().unwrap();
        let output = ctl(
            &agent,
            &["write", "--create-dirs", "--mode", "640", path],
            b"content",
        );
        assert!(output.status.success(), "{output:?}");
        let output = ctl(&agent, &["read", path], b"");
        assert_eq!(output.stdout, b"content");
        let output = ctl(&agent, &["read", "/nonexistent"], b"");
        assert_eq!(output.status.code(), Some(1));
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(
            message.contains("not found") && message.contains("/nonexistent"),
            "{message}"
        );

        let output = ctl(&agent, &["hello"], b"");
        let hello: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            hello["protocol_version"],
            roost_proto::agent::PROTOCOL_VERSION
        );
        agent
    })
    .await
    .unwrap();
    assert_eq!(agent.socket, socket);
    agent.assert_clean().await;
}

#[test]
fn wait_ready_prints_the_hello_of_an_agent_that_starts_later() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.sock");
    let waiter = Command::new(CTL)
        .args(["wait-ready", "--timeout", "30", "--listen"])
        .arg(&ready)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The agent retries its announcement, so starting it right away is fine.
    let mut agent = Command::new(agent_binary())
        .args(["channel", "--listen-unix"])
        .arg(dir.path().join("agent.sock"))
        .arg("--announce-unix")
        .arg(&ready)
        .spawn()
        .unwrap();
    let output = waiter.wait_with_output().unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(output.status.success());
    let hello: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(hello["agent_version"], env!("CARGO_PKG_VERSION"));

    let output = Command::new(CTL)
        .args(["wait-ready", "--timeout", "1", "--listen"])
        .arg(&ready)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("did not announce"));
}
