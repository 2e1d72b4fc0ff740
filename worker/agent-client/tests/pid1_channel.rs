//! The channel inside a real PID 1: the agent runs as init of a new PID namespace (as root,
//! `unshare --pid --fork --mount-proc`, with `--skip-system-setup` so this machine is left
//! alone) and serves its channel on a Unix socket. Init's reaper collects every child with
//! `waitpid(-1)`; exec statuses must still reach their execs, and orphans must still be reaped.
//!
//! Needs root and util-linux's unshare; without them the test fails saying so.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{agent_binary, children_of, wait_until};
use roost_agent_client::{AgentClient, Connector, ReadyListener, exec_shell};

fn require_root_and_unshare() {
    let root = nix_uid_is_root();
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

fn nix_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

struct Namespace {
    unshare: Child,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // --kill-child: the agent (and with it the namespace) dies with unshare.
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

#[tokio::test]
async fn exec_statuses_survive_init_s_reaper_and_orphans_are_reaped() {
    require_root_and_unshare();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let ready = ReadyListener::bind(dir.path().join("ready.sock")).unwrap();
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
        .arg(agent_binary())
        .args(["init", "--skip-system-setup"])
        .arg(format!("--channel-listen-unix={}", socket.display()))
        .arg(format!(
            "--channel-announce-unix={}",
            ready.path().display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn unshare");
    let ns = Namespace { unshare };
    let hello = ready
        .accept_hello(Duration::from_secs(20))
        .await
        .expect("PID 1 starts the channel and announces it");
    let agent_pid = children_of(ns.unshare.id())[0];
    let client = AgentClient::new(Connector::Unix(socket));
    assert_eq!(client.hello().await.unwrap(), hello);

    // Many short execs at once, each leaving an orphan behind: init reaps constantly while the
    // execs wait for their own statuses.
    let runs = (0..24).map(|i| {
        let client = client.clone();
        async move {
            let script = format!("sleep 0.2 & echo $$; exit {}", i % 7);
            client.run(exec_shell(script)).await.unwrap()
        }
    });
    // A status lost to the reaper would leave its exec waiting forever: bound the wait.
    let outputs = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(runs))
        .await
        .expect("every exec got its exit status");
    for (i, output) in outputs.iter().enumerate() {
        assert_eq!(
            output.status.code,
            Some(i32::try_from(i % 7).unwrap()),
            "exec {i}: {output:?}"
        );
        // Inside the namespace the shell has a small pid: it was not a host process.
        let pid: u32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap();
        assert!(pid > 1, "{output:?}");
    }
    // The orphaned sleeps were reparented to init and must be collected, not left as zombies.
    assert!(
        wait_until(Duration::from_secs(10), || children_of(agent_pid)
            .is_empty())
        .await,
        "init kept children: {:?}",
        children_of(agent_pid)
    );
    // Killed execs report the signal, too.
    let mut exec = client.exec(exec_shell("sleep 300")).await.unwrap();
    exec.kill().await.unwrap();
    let output = tokio::time::timeout(Duration::from_secs(30), exec.output())
        .await
        .expect("the killed exec reports its status")
        .unwrap();
    assert_eq!(output.status.signal, Some(9));
    assert!(
        wait_until(Duration::from_secs(10), || children_of(agent_pid)
            .is_empty())
        .await
    );
}
