//! Shared by the interpreter's integration tests: a Python with ipykernel, a running
//! `roost-agent interpreter`, and a tiny HTTP/1.0 client (HTTP/1.0 so that a streamed reply
//! comes without chunked framing and simply ends when the server closes).

#![allow(dead_code)] // Each test crate uses a different part.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const AGENT: &str = env!("CARGO_BIN_EXE_roost-agent");
const LISTENING_PREFIX: &str = "roost-agent interpreter: listening on ";

/// The Python of the SDK venv: `$ROOST_SDK_PYTHON`, else `target/sdk-venv/bin/python`.
/// Panics with instructions when it is missing or lacks a package the tests need.
pub fn sdk_python() -> PathBuf {
    let python = std::env::var_os("ROOST_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/sdk-venv/bin/python")
        });
    assert!(
        python.exists(),
        "no SDK venv at {}: create it with `python3 -m venv target/sdk-venv && \
         target/sdk-venv/bin/pip install -r rootfs/agent/tests/sdk/requirements.txt \
         -r rootfs/agent/tests/sdk/requirements-interpreter.txt` (or run .ci/dev), or set \
         ROOST_SDK_PYTHON",
        python.display()
    );
    let check = Command::new(&python)
        .args([
            "-c",
            "import ipykernel, matplotlib, pandas, e2b_code_interpreter, pytest",
        ])
        .output()
        .expect("run the SDK python");
    assert!(
        check.status.success(),
        "{} lacks the test packages (install rootfs/agent/tests/sdk/requirements*.txt): {}",
        python.display(),
        String::from_utf8_lossy(&check.stderr)
    );
    python
}

/// `roost-agent interpreter` with kernels from the SDK venv, running as this user in a
/// temporary directory. Stopped (SIGTERM) when dropped.
pub struct Interpreter {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Interpreter {
    /// Starts on `127.0.0.1:port` (0: any free port) with `extra` flags, and waits until it
    /// listens.
    pub fn start(port: u16, extra: &[&str]) -> Self {
        Self::start_with(port, extra, false)
    }

    /// Like [`Interpreter::start`], with init's signals blocked in the new process, as when
    /// PID 1 starts it in the guest.
    pub fn start_as_init_would(port: u16, extra: &[&str]) -> Self {
        Self::start_with(port, extra, true)
    }

    fn start_with(port: u16, extra: &[&str], block_signals: bool) -> Self {
        let python = sdk_python();
        let dir = tempfile::tempdir().expect("temp dir");
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .expect("passwd")
            .expect("current user")
            .name;
        let path = |name: &str| dir.path().join(name).display().to_string();
        let mut command = Command::new(AGENT);
        if block_signals {
            use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs between fork and exec and only calls sigprocmask, which
            // is async-signal-safe; it allocates nothing and touches no lock.
            unsafe {
                command.pre_exec(|| {
                    let mut mask = SigSet::empty();
                    for signal in [
                        Signal::SIGINT,
                        Signal::SIGTERM,
                        Signal::SIGCHLD,
                        Signal::SIGHUP,
                        Signal::SIGPWR,
                    ] {
                        mask.add(signal);
                    }
                    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = command
            .arg("interpreter")
            .args(["--listen", "127.0.0.1", "--port", &port.to_string()])
            .arg("--python")
            .arg(&python)
            .args(["--user", &user])
            .args(["--cwd", &dir.path().display().to_string()])
            .args(["--runtime-dir", &path("rt")])
            .args(["--kernel-env", &format!("IPYTHONDIR={}", path("ipython"))])
            .args(["--kernel-env", &format!("MPLCONFIGDIR={}", path("mpl"))])
            .args(extra)
            .env("RUST_LOG", "warn,roost_agent=info")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start roost-agent interpreter");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the interpreter did not say where it listens within 30 s");
        let addr = line
            .trim()
            .strip_prefix(LISTENING_PREFIX)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("listening address");
        Self { child, addr, dir }
    }
}

impl Drop for Interpreter {
    fn drop(&mut self) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reply: status, headers (lower-case names) and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The NDJSON lines of an `/execute` reply.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }
}

/// Sends one HTTP/1.0 request and reads the whole reply.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = open(addr, method, path, headers, body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the reply");
    parse_reply(&raw)
}

/// Sends a request and returns the connection, for reading a stream bit by bit.
pub fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("send head");
    stream.write_all(body.as_bytes()).expect("send body");
    stream
}

pub fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// `POST /execute` with `body` (JSON), the whole stream.
pub fn execute(addr: SocketAddr, body: &serde_json::Value) -> Vec<serde_json::Value> {
    let reply = request(addr, "POST", "/execute", &[], &body.to_string());
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.lines()
}
