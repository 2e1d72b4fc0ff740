//! The real `roost-agent` binary, run as an ordinary process serving its channel on a Unix
//! socket, and checks that it leaks nothing.
//!
//! The binary belongs to another package, so `env!("CARGO_BIN_EXE_roost-agent")` is not
//! available here; the tests build it with escargot (a `cargo build -p roost-agent` in the
//! same profile and target directory, a no-op when it is fresh), once per test binary, so they
//! never run a stale agent.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use roost_agent_client::{AgentClient, Connector, ReadyListener};
use roost_proto::agent::Hello;

/// Path of a freshly built `roost-agent`.
pub fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        escargot::CargoBuild::new()
            .manifest_path(manifest)
            .package("roost-agent")
            .bin("roost-agent")
            .current_release()
            .run()
            .expect("building roost-agent (cargo build -p roost-agent) failed")
            .path()
            .to_owned()
    })
}

/// A running `roost-agent channel --listen-unix`.
pub struct Agent {
    pub client: AgentClient,
    pub hello: Hello,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    process: Child,
    /// Open fds of the agent once it was ready and idle.
    baseline_fds: usize,
}

impl Agent {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let ready = ReadyListener::bind(dir.path().join("ready.sock")).unwrap();
        let process = Command::new(agent_binary())
            .arg("channel")
            .arg("--listen-unix")
            .arg(&socket)
            .arg("--announce-unix")
            .arg(ready.path())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn roost-agent");
        let hello = ready
            .accept_hello(Duration::from_secs(20))
            .await
            .expect("the agent announces itself");
        let mut agent = Self {
            client: AgentClient::new(Connector::Unix(socket.clone())),
            hello,
            socket,
            dir,
            process,
            baseline_fds: 0,
        };
        // The announcement connection may still be closing: wait for the count to settle.
        let mut last = agent.fd_count();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(20));
            let now = agent.fd_count();
            if now == last {
                break;
            }
            last = now;
        }
        agent.baseline_fds = last;
        agent
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Direct children of the agent (zombies included).
    pub fn children(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// Waits until the agent is back to its idle fd count and has no children; panics with
    /// what leaked otherwise. Call at the end of each test, after dropping every handle.
    pub async fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (fds, children) = (self.fd_count(), self.children());
            if fds == self.baseline_fds && children.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let listing: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .map(|e| format!("{:?}", std::fs::read_link(e.path()).ok()))
                            .collect()
                    })
                    .unwrap_or_default();
                panic!(
                    "agent leaked: {fds} fds (idle: {}) {listing:?}, children {children:?}",
                    self.baseline_fds
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Panics unless the agent process is still running.
    pub fn assert_alive(&mut self) {
        assert!(
            self.process.try_wait().unwrap().is_none(),
            "the agent exited"
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

pub fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok())
                .flat_map(|t| {
                    std::fs::read_to_string(t.path().join("children"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for `done` up to `timeout`.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}
