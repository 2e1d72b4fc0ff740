//! [`SandboxSplicer`]: the gateway tunnel's way into the manager's running sandboxes. Like
//! [`crate::tunnel::VmSplicer`] it opens a stream through the agent's port forward, but it is
//! fed by the manager ([`Routes`]) and rides out the moments right after a restore (create or
//! resume) when the guest is still settling its vsock transport reset: a forward whose
//! connection to the agent fails (no answer, handshake or connection closed) is retried for a
//! short bounded time before the gateway gets its error. Refusals by the agent are final.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use roost_agent_client::Error as AgentError;
use roost_proto::SandboxId;
use roost_proto::agent::ErrorKind;
use tokio::net::UnixStream;

use super::backend::Routes;
use crate::tunnel::{SpliceError, Splicer};
use crate::vm_handle::{VmError, VmHandle};

/// How long a forward that reached no agent is retried.
const RETRY_FOR: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// Running sandboxes by id, for the tunnel.
#[derive(Debug, Default)]
pub struct SandboxSplicer {
    vms: RwLock<HashMap<String, Arc<VmHandle>>>,
}

impl SandboxSplicer {
    pub fn new() -> Self {
        Self::default()
    }

    fn vm(&self, sandbox_id: &str) -> Option<Arc<VmHandle>> {
        self.vms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sandbox_id)
            .cloned()
    }
}

impl Routes<VmHandle> for SandboxSplicer {
    fn up(&self, sandbox_id: &str, vm: Arc<VmHandle>) {
        self.vms
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sandbox_id.to_owned(), vm);
    }

    fn down(&self, sandbox_id: &str) {
        self.vms
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sandbox_id);
    }
}

impl Splicer for SandboxSplicer {
    type Stream = UnixStream;

    async fn open(&self, sandbox_id: &SandboxId, port: u16) -> Result<UnixStream, SpliceError> {
        let deadline = Instant::now() + RETRY_FOR;
        let mut attempts = 0u32;
        loop {
            // Looked up each time: a pause or kill meanwhile ends the attempts.
            let vm = self
                .vm(sandbox_id.as_str())
                .ok_or(SpliceError::SandboxNotFound)?;
            attempts += 1;
            let error = match vm.forward_port(port).await {
                Ok(stream) => return Ok(stream),
                Err(error) => error,
            };
            if no_agent_yet(&error) && Instant::now() < deadline {
                tracing::debug!(
                    sandbox = %sandbox_id,
                    port,
                    attempts,
                    error = %chain(&error),
                    "forward reached no agent; retrying"
                );
                tokio::time::sleep(RETRY_EVERY).await;
                continue;
            }
            tracing::debug!(sandbox = %sandbox_id, port, attempts, error = %chain(&error), "forward failed");
            return Err(classify(&error));
        }
    }
}

/// A failure to reach the agent at all, as opposed to an answer from it or a VM that is gone.
fn no_agent_yet(error: &VmError) -> bool {
    matches!(
        error,
        VmError::Agent(
            AgentError::Connect { .. }
                | AgentError::Handshake { .. }
                | AgentError::HandshakeTimeout { .. }
                | AgentError::Io(_)
                | AgentError::Frame(_)
                | AgentError::Closed(_)
        )
    )
}

/// The error and its sources on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The tunnel's view of a failed forward (as [`crate::tunnel::VmSplicer`] reports it): the
/// agent's "connection refused" means the port is closed.
fn classify(error: &VmError) -> SpliceError {
    match error {
        VmError::Agent(agent) if agent.agent_kind() == Some(ErrorKind::ConnectionRefused) => {
            SpliceError::PortClosed
        }
        VmError::Agent(AgentError::Agent(reply)) => {
            SpliceError::Failed(format!("the sandbox's agent refused: {}", reply.message))
        }
        VmError::Agent(_) => SpliceError::Failed(format!(
            "the sandbox's agent did not answer: {}",
            chain(error)
        )),
        VmError::VmmExited { exit, .. } => SpliceError::Failed(format!("the VM is gone: {exit}")),
        VmError::Api(_) | VmError::NoControlApi | VmError::Identity(_) => {
            SpliceError::Failed(error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_sandboxes_are_not_found_and_routes_come_and_go() {
        let splicer = SandboxSplicer::new();
        let id: SandboxId = "cl-abc".parse().unwrap();
        assert_eq!(
            splicer.open(&id, 80).await.unwrap_err(),
            SpliceError::SandboxNotFound
        );
        assert!(splicer.vm("cl-abc").is_none());
        splicer.down("cl-abc");
    }

    #[test]
    fn only_connection_failures_are_retried() {
        let closed = VmError::Agent(AgentError::Closed("the reply"));
        assert!(no_agent_yet(&closed));
        let refused = VmError::Agent(AgentError::Agent(roost_proto::agent::ErrorReply {
            kind: ErrorKind::ConnectionRefused,
            message: "refused".into(),
        }));
        assert!(!no_agent_yet(&refused));
        assert_eq!(classify(&refused), SpliceError::PortClosed);
        assert!(
            matches!(classify(&closed), SpliceError::Failed(m) if m.contains("before the reply"))
        );
        assert!(!no_agent_yet(&VmError::NoControlApi));
    }
}
