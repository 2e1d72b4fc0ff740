//! The worker's channel into the guest: the agent side of the protocol in
//! `roost_proto::agent` (hello, health, exec, file read/write, port forwarding, and a
//! relay to the envd API's private init socket).
//!
//! Inside a VM, PID 1 starts it on a thread of its own ([`spawn`]) after system setup: it
//! listens on vsock port [`roost_proto::agent::AGENT_PORT`] and announces itself to the host
//! on [`roost_proto::agent::READY_PORT`]. The same code runs as an ordinary process for tests
//! and development (`roost-agent channel --listen-unix PATH`, [`run_standalone`]).
//!
//! Each connection is one operation, served on a task of a current-thread tokio runtime (file
//! reads and writes go to tokio's blocking pool). Processes started for exec are registered in
//! [`crate::children`] and collected by the one reaper of the process: init's `waitpid(-1)`
//! loop as PID 1, a SIGCHLD task here otherwise.

mod announce;
mod connection;
mod exec;
mod files;
mod forward;
mod loopback;
mod status;
mod transport;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Semaphore;

pub use transport::{Announce, Listen};

use crate::identity::{IdentityConfig, SystemEffects};
use crate::say;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;

/// Where the channel listens, whom it tells that it is ready, where the envd API's private
/// init socket is (the one place `forward` with target `envd_init` connects to), and what the
/// identity operation may change ([`crate::identity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub listen: Listen,
    pub announce: Announce,
    pub envd_init_socket: PathBuf,
    /// Machine-wide settings `identity` applies: all of them in a VM (the default).
    pub identity_effects: SystemEffects,
    /// The code interpreter's admin socket, which `identity` hands the access token to.
    pub interpreter_admin_socket: PathBuf,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            listen: Listen::default(),
            announce: Announce::default(),
            envd_init_socket: crate::envd::DEFAULT_INIT_SOCKET.into(),
            identity_effects: SystemEffects::ALL,
            interpreter_admin_socket: crate::identity::DEFAULT_INTERPRETER_ADMIN_SOCKET.into(),
        }
    }
}

impl Endpoints {
    fn identity_config(&self) -> IdentityConfig {
        IdentityConfig {
            effects: self.identity_effects,
            envd_init_socket: self.envd_init_socket.clone(),
            interpreter_admin_socket: self.interpreter_admin_socket.clone(),
        }
    }
}

/// Starts the channel on its own thread (PID 1: init's loop stays on the main thread and
/// reaps). In a VM (vsock) it first brings up the loopback interface that port forwarding
/// connects through. Failures are reported on the console; the guest keeps running without a
/// channel.
pub fn spawn(endpoints: Endpoints) {
    if matches!(endpoints.listen, Listen::Vsock { .. })
        && let Err(e) = loopback::bring_up()
    {
        say!("cannot bring up lo (port forwarding will fail): {e}");
    }
    let started = std::thread::Builder::new()
        .name("channel".into())
        .spawn(move || {
            if let Err(e) = run(&endpoints, Reaper::Init) {
                say!("channel on {}: {e}", endpoints.listen);
            }
        });
    if let Err(e) = started {
        say!("cannot start the channel thread: {e}");
    }
}

/// Runs the channel in this process until it fails, reaping children itself.
pub fn run_standalone(endpoints: &Endpoints) -> io::Result<()> {
    run(endpoints, Reaper::OwnSigchld)
}

/// Who collects exited children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaper {
    /// PID 1's loop (which blocks SIGCHLD in every thread and reads it from a signalfd).
    Init,
    /// This process, on SIGCHLD.
    OwnSigchld,
}

fn run(endpoints: &Endpoints, reaper: Reaper) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(endpoints, reaper))
}

async fn serve(endpoints: &Endpoints, reaper: Reaper) -> io::Result<()> {
    if reaper == Reaper::OwnSigchld {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        tokio::spawn(async move {
            while sigchld.recv().await.is_some() {
                crate::children::reap_registered();
            }
        });
    }
    let listener = transport::Listener::bind(&endpoints.listen)?;
    if endpoints.announce != Announce::Nowhere {
        tokio::spawn(announce::hello(endpoints.announce.clone()));
    }
    let identity = Arc::new(endpoints.identity_config());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        match listener.accept().await {
            Ok(io) => {
                let identity = Arc::clone(&identity);
                tokio::spawn(async move {
                    connection::serve(io, &identity).await;
                    drop(slot);
                });
            }
            // Out of fds or memory: wait a little rather than spin.
            Err(e) => {
                say!("channel: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
