//! Starting the `roost-pager serve` process of a userfaultfd restore. The VMM connects to the
//! page server's socket while it builds guest memory, so the socket must be listening before
//! the VMM starts; this waits for it (bounded), and a page server that exits instead is
//! reported with its stderr. The process is a [`VmmProcess`]: parent-death signal, reaped by
//! its own waiter thread, killed when the handle drops it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::config::PagerOptions;
use super::runtime_dir::{RuntimeDir, tail};
use super::{BootError, VmmProcess};

/// How long the page server may take to open and check the snapshot's memory chain and
/// listen on its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the socket file is looked for meanwhile.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// How long the page server waits for the VMM to connect before it gives up and exits.
const ACCEPT_TIMEOUT_SECS: u64 = 30;

/// Spawns the page server for the snapshot in `snapshot_dir` and waits until it listens.
pub async fn start(
    options: &PagerOptions,
    snapshot_dir: &Path,
    dir: &RuntimeDir,
) -> Result<VmmProcess, BootError> {
    let stderr = std::fs::File::create(dir.pager_stderr()).map_err(|source| BootError::Io {
        path: dir.pager_stderr(),
        source,
    })?;
    let socket = dir.pager_socket();
    let mut command = Command::new(&options.binary);
    command
        .args(["serve", "--snapshot"])
        .arg(snapshot_dir)
        .arg("--socket")
        .arg(&socket)
        .args(["--accept-timeout-secs", &ACCEPT_TIMEOUT_SECS.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if let Some(prefetch) = &options.prefetch {
        command.arg("--prefetch").arg(prefetch);
    }
    if let Some(record) = &options.record {
        command.arg("--record-working-set").arg(record);
    }
    let pager =
        VmmProcess::spawn(command, dir.path().to_owned()).map_err(|source| BootError::Spawn {
            binary: options.binary.clone(),
            source,
        })?;
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        if socket.exists() {
            return Ok(pager);
        }
        if let Some(exit) = pager.try_exit() {
            return Err(BootError::PagerStart {
                socket,
                detail: format!(
                    "it exited ({exit}): {}",
                    tail(&dir.pager_stderr(), 4096).trim()
                ),
            });
        }
        if Instant::now() > deadline {
            return Err(BootError::PagerStart {
                socket,
                detail: format!("not listening after {LISTEN_TIMEOUT:?}"),
            });
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
