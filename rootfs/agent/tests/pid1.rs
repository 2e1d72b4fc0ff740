//! roost-agent as a real PID 1, without a VM: as root, `unshare --pid --fork --mount-proc`
//! runs the agent as init of a new PID namespace (with `--skip-system-setup`, so it leaves this
//! machine's mounts and hostname alone). Orphans of that namespace are reparented to it, and
//! `reboot()` from a namespace's init ends the namespace, which the test observes.
//!
//! Needs root and util-linux's unshare/nsenter; without them the tests fail with a message
//! saying so rather than passing silently.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_roost-agent");
const READY_PREFIX: &str = "roost-agent: ready";

/// Panics, saying what is missing, unless the tests can run here.
fn require_root_and_util_linux() {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    });
    let tools = ["unshare", "nsenter"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(
        root && tools,
        "these tests need root and util-linux's unshare/nsenter (root: {root}, tools: {tools})"
    );
}

/// The agent running as PID 1 of a fresh PID namespace.
struct Namespace {
    unshare: Child,
    stdout: BufReader<ChildStdout>,
    /// The agent's PID as seen from this (outer) namespace.
    agent_pid: u32,
}

impl Namespace {
    fn start() -> Self {
        let mut unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
            .args([AGENT, "init", "--skip-system-setup"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn unshare");
        let mut stdout = BufReader::new(unshare.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the ready line");
        assert!(line.starts_with(READY_PREFIX), "first line: {line:?}");
        assert!(
            line.contains(" hostname=") && line.contains(" uptime="),
            "{line:?}"
        );
        let agent_pid = children(unshare.id())[0];
        assert_eq!(comm(agent_pid).as_deref(), Some("roost-agent"));
        Self {
            unshare,
            stdout,
            agent_pid,
        }
    }

    /// Runs `args` inside the namespace (PID and mount namespaces, so /proc is the
    /// namespace's) and waits for it.
    fn run(&self, args: &[&str]) -> ExitStatus {
        Command::new("nsenter")
            .args([
                "--target",
                &self.agent_pid.to_string(),
                "--pid",
                "--mount",
                "--",
            ])
            .args(args)
            .status()
            .expect("spawn nsenter")
    }

    /// Waits for unshare to end, which it does once the namespace's init is gone.
    fn wait_end(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.unshare.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the namespace did not end within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn rest_of_stdout(&mut self) -> String {
        let mut rest = String::new();
        while self.stdout.read_line(&mut rest).unwrap_or(0) > 0 {}
        rest
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn children(pid: u32) -> Vec<u32> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// `reboot()` from a PID namespace's init kills it with SIGHUP (RB_AUTOBOOT); unshare passes
/// the signal on by killing itself with it.
fn assert_rebooted(status: ExitStatus) {
    assert_eq!(
        status.signal(),
        Some(libc_sighup()),
        "unshare ended with {status:?}"
    );
}

fn libc_sighup() -> i32 {
    1
}

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

#[test]
fn reaps_orphans_and_powers_off_on_sigterm() {
    require_root_and_util_linux();
    let mut ns = Namespace::start();
    // The shell exits at once; its background `sleep` is orphaned and reparented to init.
    assert!(ns.run(&["sh", "-c", "sleep 0.5 & exit 0"]).success());
    let orphans = children(ns.agent_pid);
    assert_eq!(orphans.len(), 1, "init's children: {orphans:?}");
    let orphan = orphans[0];
    // The background child may still be the forked `sh` that is about to exec `sleep`.
    assert!(
        wait_until(Duration::from_secs(5), || comm(orphan).as_deref()
            == Some("sleep")),
        "orphan {orphan} is {:?}, not sleep",
        comm(orphan)
    );
    // Once it exits it is a zombie until init reaps it; then it is gone entirely.
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{orphan}"
        ))
        .exists()),
        "orphan {orphan} was not reaped (state: {:?})",
        std::fs::read_to_string(format!("/proc/{orphan}/stat")).ok()
    );

    let agent = ns.agent_pid;
    assert!(
        Command::new("kill")
            .args(["-TERM", &agent.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert_rebooted(ns.wait_end(Duration::from_secs(10)));
    assert!(!Path::new(&format!("/proc/{agent}")).exists());
    let rest = ns.rest_of_stdout();
    assert!(
        !rest.contains(READY_PREFIX),
        "ready line printed twice: {rest:?}"
    );
}

#[test]
fn poweroff_subcommand_stops_every_process_then_ends_the_namespace() {
    require_root_and_util_linux();
    let mut ns = Namespace::start();
    // A process that ignores SIGTERM must be SIGKILLed after the grace period...
    assert!(
        ns.run(&["sh", "-c", "trap '' TERM; sleep 100 & exit 0"])
            .success()
    );
    // ...and one that honours it must stop at once.
    assert!(ns.run(&["sh", "-c", "sleep 100 & exit 0"]).success());
    let victims = children(ns.agent_pid);
    assert_eq!(victims.len(), 2, "{victims:?}");

    let started = Instant::now();
    // The command runs inside the namespace, so the shutdown it starts may SIGTERM it before
    // it exits: either outcome means the request was delivered.
    let poweroff = ns.run(&[AGENT, "poweroff"]);
    assert!(
        poweroff.success() || matches!(poweroff.signal(), Some(SIGTERM | SIGKILL)),
        "roost-agent poweroff failed: {poweroff:?}"
    );
    assert_rebooted(ns.wait_end(Duration::from_secs(10)));
    let took = started.elapsed();
    for pid in victims {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived"
        );
    }
    assert!(
        took >= Duration::from_secs(2),
        "SIGKILL came before the grace period: {took:?}"
    );
}

#[test]
fn without_pid1_or_subcommand_it_prints_usage_and_exits_2() {
    let output = Command::new(AGENT).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("usage: roost-agent"));
    let version = Command::new(AGENT).arg("version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("roost-agent "));
}

#[test]
fn poweroff_refuses_when_pid1_is_not_roost_agent() {
    // On this machine PID 1 is something else: the command must not signal it.
    let output = Command::new(AGENT).arg("poweroff").output().unwrap();
    assert!(!output.status.success());
}
