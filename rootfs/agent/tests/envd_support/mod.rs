//! Starting `roost-agent serve` for the envd tests, and the `user` account they act as.

#![allow(dead_code)] // Each test binary uses a different part.

pub mod http;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The sandbox user the agent acts as by default; created when missing (tests run as root).
pub const USER: &str = "user";

/// Makes sure the account `user` (home /home/user) exists, creating it with `useradd`.
/// Returns its uid and gid.
pub fn ensure_user() -> (u32, u32) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the envd tests run as root: they switch to the `user` account and create it if missing"
    );
    // Test binaries run in parallel and useradd fails while another holds /etc/passwd's
    // lock: retry until the account exists.
    let mut attempts = 0;
    while nix::unistd::User::from_name(USER).unwrap().is_none() {
        let output = Command::new("useradd")
            .args([
                "--create-home",
                "--home-dir",
                "/home/user",
                "--shell",
                "/bin/bash",
                USER,
            ])
            .output()
            .expect("run useradd");
        attempts += 1;
        assert!(
            output.status.success() || attempts < 50,
            "useradd user failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let user = nix::unistd::User::from_name(USER)
        .unwrap()
        .expect("user exists");
    std::fs::create_dir_all(&user.dir).unwrap();
    nix::unistd::chown(&user.dir, Some(user.uid), Some(user.gid)).unwrap();
    (user.uid.as_raw(), user.gid.as_raw())
}

/// A running `roost-agent serve`, stopped on drop.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    /// The agent's `--root`, owned by `user`.
    pub root: tempfile::TempDir,
    pub init_socket: PathBuf,
}

impl Agent {
    /// Starts the agent on `port` (0 picks a free one) with extra flags.
    pub fn start(port: u16, extra: &[&str]) -> Self {
        let (uid, gid) = ensure_user();
        let root = tempfile::Builder::new()
            .prefix("roost-envd-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(
            root.path(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .unwrap();
        let port = if port == 0 { free_port() } else { port };
        let init_socket = root.path().join(".init.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_roost-agent"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .arg("--root")
            .arg(root.path())
            .arg("--init-socket")
            .arg(&init_socket)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("start roost-agent serve");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let agent = Self {
            child,
            addr,
            root,
            init_socket,
        };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "roost-agent serve never listened on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn root_path(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The SDK venv's python: `$ROOST_SDK_PYTHON`, else `target/sdk-venv/bin/python`. Panics
/// with the install command when neither exists.
pub fn sdk_python() -> PathBuf {
    if let Some(python) = std::env::var_os("ROOST_SDK_PYTHON") {
        let python = PathBuf::from(python);
        assert!(
            python.exists(),
            "ROOST_SDK_PYTHON={} does not exist",
            python.display()
        );
        return python;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fallback = workspace.join("target/sdk-venv/bin/python");
    assert!(
        fallback.exists(),
        "no SDK venv: set ROOST_SDK_PYTHON or run `python3 -m venv target/sdk-venv && \
         target/sdk-venv/bin/pip install -r rootfs/agent/tests/sdk/requirements.txt`"
    );
    fallback
}
