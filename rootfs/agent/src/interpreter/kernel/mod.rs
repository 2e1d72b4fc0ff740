//! One Jupyter kernel driven over the Jupyter wire protocol (ZeroMQ, via `jupyter-zmq-client`).
//!
//! [`Kernel::start`] starts the process ([`process`]), connects a SUB socket to IOPub and a
//! DEALER to the shell channel, and waits until a `kernel_info_request` comes back idle on
//! IOPub — which also proves the subscription is live, so no output of the first cell is lost
//! (a SUB socket that joins late misses what was published before). Two reader tasks route
//! every message by its parent's `msg_id` to whoever submitted that request ([`Submission`]).

pub mod process;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jupyter_zmq_client::{
    ClientIoPubConnection, ExecuteRequest, JupyterMessage, JupyterMessageContent,
    KernelInfoRequest, RuntimeError,
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use process::{KernelCommand, KernelProcess, SpawnError};

/// Messages buffered per request before the readers wait for the consumer.
const ROUTE_CAPACITY: usize = 1024;
/// How long one `kernel_info_request` may go unanswered before another is sent.
const NUDGE_INTERVAL: Duration = Duration::from_millis(500);
/// How often to retry connecting while the kernel has not bound its sockets yet.
const CONNECT_RETRY: Duration = Duration::from_millis(25);
/// Malformed messages from a kernel logged at most this many times (a kernel is user code).
const PARSE_WARNINGS: u32 = 10;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot start the kernel process")]
    Spawn(#[from] SpawnError),
    #[error("the kernel exited while starting ({status}); its stderr ends with: {stderr}")]
    Exited { status: String, stderr: String },
    #[error("the kernel did not answer within {0:?}; its stderr ends with: {1}")]
    Timeout(Duration, String),
    #[error("cannot talk to the kernel")]
    Protocol(#[source] RuntimeError),
}

#[derive(Debug, Error)]
pub enum SubmitError {
    #[error("the kernel has exited ({0})")]
    Exited(String),
    #[error("cannot send to the kernel")]
    Send(#[source] RuntimeError),
}

type Routes = Arc<Mutex<HashMap<String, mpsc::Sender<JupyterMessage>>>>;

/// A started kernel. Dropping it kills the process.
pub struct Kernel {
    process: KernelProcess,
    shell: jupyter_zmq_client::DealerSendConnection,
    routes: Routes,
    readers: Vec<JoinHandle<()>>,
    /// Whether the sandbox's env vars (from envd) are set in this kernel yet.
    sandbox_env_set: bool,
}

impl Kernel {
    /// Starts a kernel named `name` (the context id) in `cwd` and waits until it answers.
    pub async fn start(
        command: &KernelCommand,
        name: &str,
        cwd: &std::path::Path,
        timeout: Duration,
    ) -> Result<Self, StartError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let process = KernelProcess::spawn(command, name, cwd)?;
        let session_id = uuid::Uuid::new_v4().to_string();
        let (iopub, shell) = connect(&process, &session_id, deadline, timeout).await?;
        let (shell_send, shell_recv) = shell.split();
        let routes: Routes = Arc::default();
        let readers = vec![
            tokio::spawn(route_iopub(iopub, Arc::clone(&routes), process.pid())),
            tokio::spawn(route_shell(shell_recv, Arc::clone(&routes), process.pid())),
        ];
        let mut kernel = Self {
            process,
            shell: shell_send,
            routes,
            readers,
            sandbox_env_set: false,
        };
        kernel.wait_until_ready(deadline, timeout).await?;
        tracing::info!(
            kernel = name,
            pid = kernel.process.pid().as_raw(),
            ready_ms = started.elapsed().as_millis(),
            "kernel ready"
        );
        Ok(kernel)
    }

    /// Sends `kernel_info_request`s until one is seen going idle on IOPub.
    async fn wait_until_ready(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), StartError> {
        loop {
            self.check_alive()?;
            let request: JupyterMessage = KernelInfoRequest {}.into();
            let mut submission = match self.submit_message(request).await {
                Ok(submission) => submission,
                Err(SubmitError::Exited(status)) => {
                    return Err(StartError::Exited {
                        status,
                        stderr: self.process.stderr_tail(),
                    });
                }
                Err(SubmitError::Send(e)) => return Err(StartError::Protocol(e)),
            };
            let nudge = Instant::now() + NUDGE_INTERVAL;
            loop {
                let wait_until = nudge.min(deadline);
                match tokio::time::timeout_at(wait_until, submission.next()).await {
                    Ok(Some(message)) => {
                        if let JupyterMessageContent::Status(status) = &message.content
                            && status.execution_state == jupyter_zmq_client::ExecutionState::Idle
                        {
                            return Ok(());
                        }
                    }
                    Ok(None) => break,
                    Err(_elapsed) => break,
                }
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout(timeout, self.process.stderr_tail()));
            }
        }
    }

    fn check_alive(&self) -> Result<(), StartError> {
        match self.process.exit_status() {
            Some(status) => Err(StartError::Exited {
                status,
                stderr: self.process.stderr_tail(),
            }),
            None => Ok(()),
        }
    }

    /// Sends an `execute_request`; the [`Submission`] yields every message it causes.
    pub async fn execute(&mut self, request: ExecuteRequest) -> Result<Submission, SubmitError> {
        self.submit_message(request.into()).await
    }

    async fn submit_message(&mut self, message: JupyterMessage) -> Result<Submission, SubmitError> {
        if let Some(status) = self.process.exit_status() {
            return Err(SubmitError::Exited(status));
        }
        let msg_id = message.header.msg_id.clone();
        let (tx, rx) = mpsc::channel(ROUTE_CAPACITY);
        if let Ok(mut routes) = self.routes.lock() {
            routes.insert(msg_id.clone(), tx);
        }
        let submission = Submission {
            msg_id,
            rx,
            exit: self.process.exit_watch(),
            routes: Arc::clone(&self.routes),
        };
        self.shell.send(message).await.map_err(SubmitError::Send)?;
        Ok(submission)
    }

    /// Whether the sandbox's env vars still have to be set in this kernel.
    pub fn needs_sandbox_env(&self) -> bool {
        !self.sandbox_env_set
    }

    pub fn mark_sandbox_env_set(&mut self) {
        self.sandbox_env_set = true;
    }

    /// Interrupts the running cell (SIGINT to the kernel's process group).
    pub fn interrupt(&self) {
        self.process.interrupt();
    }

    /// Why the kernel process ended, if it has.
    pub fn exit_status(&self) -> Option<String> {
        self.process.exit_status()
    }

    /// The process, to kill it without holding the kernel.
    pub fn pid(&self) -> nix::unistd::Pid {
        self.process.pid()
    }

    /// Kills the kernel and waits until the process is gone.
    pub async fn shut_down(self) {
        self.process.kill().await;
    }
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("process", &self.process)
            .finish_non_exhaustive()
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// The messages caused by one request, in the order the kernel sent them.
#[derive(Debug)]
pub struct Submission {
    msg_id: String,
    rx: mpsc::Receiver<JupyterMessage>,
    exit: watch::Receiver<Option<String>>,
    routes: Routes,
}

impl Submission {
    /// The next message; `None` once the kernel has exited (after what it sent before).
    pub async fn next(&mut self) -> Option<JupyterMessage> {
        if self.exit.borrow().is_some() {
            return self.rx.try_recv().ok();
        }
        tokio::select! {
            biased;
            message = self.rx.recv() => message,
            _ = self.exit.wait_for(Option::is_some) => self.rx.try_recv().ok(),
        }
    }

    /// Why the kernel exited, if it has.
    pub fn kernel_exit(&self) -> Option<String> {
        self.exit.borrow().clone()
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.routes.lock() {
            routes.remove(&self.msg_id);
        }
    }
}

/// Connects IOPub and shell, retrying while the kernel has not bound its sockets yet.
async fn connect(
    process: &KernelProcess,
    session_id: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<
    (
        ClientIoPubConnection,
        jupyter_zmq_client::ClientShellConnection,
    ),
    StartError,
> {
    let info = process.connection();
    let identity =
        jupyter_zmq_client::peer_identity_for_session(session_id).map_err(StartError::Protocol)?;
    loop {
        let attempt = async {
            let iopub =
                jupyter_zmq_client::create_client_iopub_connection(info, "", session_id).await?;
            let shell = jupyter_zmq_client::create_client_shell_connection_with_identity(
                info,
                session_id,
                identity.clone(),
            )
            .await?;
            Ok::<_, RuntimeError>((iopub, shell))
        };
        match attempt.await {
            Ok(connections) => return Ok(connections),
            Err(e) => {
                if let Some(status) = process.exit_status() {
                    return Err(StartError::Exited {
                        status,
                        stderr: process.stderr_tail(),
                    });
                }
                if Instant::now() >= deadline {
                    tracing::debug!("last connection attempt: {e}");
                    return Err(StartError::Timeout(timeout, process.stderr_tail()));
                }
                tokio::time::sleep(CONNECT_RETRY).await;
            }
        }
    }
}

async fn route_iopub(mut iopub: ClientIoPubConnection, routes: Routes, pid: nix::unistd::Pid) {
    let mut warnings = 0;
    loop {
        match iopub.read().await {
            Ok(message) => deliver(&routes, message).await,
            Err(e) if is_bad_message(&e) => warn_bad_message(&mut warnings, pid, "IOPub", &e),
            Err(e) => {
                tracing::debug!(pid = pid.as_raw(), "IOPub closed: {e}");
                return;
            }
        }
    }
}

async fn route_shell(
    mut shell: jupyter_zmq_client::DealerRecvConnection,
    routes: Routes,
    pid: nix::unistd::Pid,
) {
    let mut warnings = 0;
    loop {
        match shell.read().await {
            Ok(message) => deliver(&routes, message).await,
            Err(e) if is_bad_message(&e) => warn_bad_message(&mut warnings, pid, "shell", &e),
            Err(e) => {
                tracing::debug!(pid = pid.as_raw(), "shell closed: {e}");
                return;
            }
        }
    }
}

/// Hands a message to the submission its parent header names; others are dropped.
async fn deliver(routes: &Routes, message: JupyterMessage) {
    let Some(parent) = message.parent_header.as_ref() else {
        return;
    };
    let sender = routes
        .lock()
        .ok()
        .and_then(|routes| routes.get(&parent.msg_id).cloned());
    if let Some(sender) = sender {
        // A consumer that went away has nothing left to receive.
        let _ = sender.send(message).await;
    }
}

/// Errors about one message (bad JSON, a signature that does not match, missing parts), as
/// opposed to the socket failing.
fn is_bad_message(error: &RuntimeError) -> bool {
    matches!(
        error,
        RuntimeError::ParseError { .. }
            | RuntimeError::SerdeError(_)
            | RuntimeError::InsufficientMessageParts(_)
            | RuntimeError::MissingDelimiter
            | RuntimeError::MissingHmac
            | RuntimeError::VerifyError(_)
            | RuntimeError::DecodeError(_)
            | RuntimeError::ZmqMessageError(_)
    )
}

fn warn_bad_message(count: &mut u32, pid: nix::unistd::Pid, channel: &str, error: &RuntimeError) {
    *count = count.saturating_add(1);
    if *count <= PARSE_WARNINGS {
        tracing::warn!(
            pid = pid.as_raw(),
            "skipping a bad {channel} message: {error}"
        );
    }
}
