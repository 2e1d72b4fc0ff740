//! The envd API served by roost-agent as a real PID 1 (of a new PID namespace, as in
//! tests/pid1.rs): there init's `waitpid(-1)` reaper collects every child, and the exit
//! statuses of processes started through the API must still reach their streams, also when
//! they leave orphans behind and when many end at once.
//!
//! Needs root and util-linux's unshare; fails saying so otherwise.

mod envd_support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envd_support::http::{basic, envelope, send};

struct Pid1Agent {
    unshare: Child,
    addr: SocketAddr,
}

impl Drop for Pid1Agent {
    fn drop(&mut self) {
        // --kill-child: the agent (the namespace's init) dies with unshare, and with it the
        // whole namespace.
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn start() -> Pid1Agent {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs roost-agent as PID 1 of a PID namespace: it needs root"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
        .args([
            env!("CARGO_BIN_EXE_roost-agent"),
            "init",
            "--skip-system-setup",
        ])
        .arg(format!("--envd-listen={addr}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn unshare (util-linux) to run the agent as PID 1");
    let mut line = String::new();
    BufReader::new(unshare.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("roost-agent: ready"),
        "first line: {line:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "PID 1 never served envd on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Pid1Agent { unshare, addr }
}

/// Runs `script` with sh as root through `process.Process/Start`; returns the end event.
fn run(addr: SocketAddr, script: &str) -> serde_json::Value {
    let request =
        serde_json::json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}, "stdin": false});
    let reply = send(
        addr,
        "POST",
        "/process.Process/Start",
        &[
            ("Content-Type", "application/connect+json"),
            ("Authorization", &basic("root")),
        ],
        &envelope(0, request.to_string().as_bytes()),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.stream_error(), None, "{script}");
    reply
        .envelopes()
        .iter()
        .find_map(|(_, j)| j["event"].get("end").cloned())
        .unwrap_or_else(|| panic!("no end event for {script}"))
}

#[test]
fn envd_pid1_exit_statuses_reach_their_streams() {
    let agent = start();
    let end = run(agent.addr, "sleep 0.2; exit 7");
    assert_eq!(end["exitCode"], 7);
    assert_eq!(end["status"], "exit status 7");

    // A process that leaves an orphan: init reaps the orphan, the stream gets the parent's
    // status.
    let end = run(agent.addr, "(sleep 0.3 >/dev/null 2>&1 &); exit 3");
    assert_eq!(end["exitCode"], 3);

    // Init blocks signals for its signalfd; processes must not inherit that mask.
    let end = run(
        agent.addr,
        "grep -q '^SigBlk:[[:space:]]*0*$' /proc/self/status",
    );
    assert_eq!(
        end["status"], "exit status 0",
        "started with blocked signals"
    );

    // Killed by a signal.
    let end = run(agent.addr, "kill -9 $$");
    assert_eq!(end["status"], "signal: killed");

    // Many short processes ending together, each with its own status.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let addr = agent.addr;
            std::thread::spawn(move || (i, run(addr, &format!("exit {i}"))))
        })
        .collect();
    for thread in threads {
        let (i, end) = thread.join().unwrap();
        assert_eq!(
            end["exitCode"].as_i64().unwrap_or(0),
            i,
            "process {i}: {end}"
        );
        assert_eq!(end["status"], format!("exit status {i}"));
    }
}
