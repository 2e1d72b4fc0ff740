//! [`VmSplicer`]: tunnel streams into microVMs through the in-guest agent's port forward
//! (`VmHandle::forward_port`, a vsock connection the agent joins to `127.0.0.1:PORT` inside
//! the guest).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use roost_agent_client::Error as AgentError;
use roost_proto::SandboxId;
use roost_proto::agent::ErrorKind;
use tokio::net::UnixStream;

use super::{SpliceError, Splicer};
use crate::vm_handle::{VmError, VmHandle};

/// The sandboxes this worker runs, by id, and their VMs.
#[derive(Debug, Default)]
pub struct VmSplicer {
    vms: RwLock<HashMap<SandboxId, Arc<VmHandle>>>,
}

impl VmSplicer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `sandbox_id`'s ports reachable through `vm`.
    pub fn insert(&self, sandbox_id: SandboxId, vm: Arc<VmHandle>) {
        self.vms
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sandbox_id, vm);
    }

    /// Stops routing to `sandbox_id` (streams already spliced keep going until the VM ends).
    pub fn remove(&self, sandbox_id: &SandboxId) -> Option<Arc<VmHandle>> {
        self.vms
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sandbox_id)
    }

    fn vm(&self, sandbox_id: &SandboxId) -> Option<Arc<VmHandle>> {
        self.vms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sandbox_id)
            .cloned()
    }
}

impl Splicer for VmSplicer {
    type Stream = UnixStream;

    async fn open(&self, sandbox_id: &SandboxId, port: u16) -> Result<UnixStream, SpliceError> {
        let vm = self.vm(sandbox_id).ok_or(SpliceError::SandboxNotFound)?;
        vm.forward_port(port).await.map_err(|e| classify(&e))
    }
}

/// The tunnel's view of a failed forward: the agent's "connection refused" means the port is
/// closed; everything else is reported with its message.
fn classify(error: &VmError) -> SpliceError {
    match error {
        VmError::Agent(agent) if agent.agent_kind() == Some(ErrorKind::ConnectionRefused) => {
            SpliceError::PortClosed
        }
        VmError::Agent(AgentError::Agent(reply)) => {
            SpliceError::Failed(format!("the sandbox's agent refused: {}", reply.message))
        }
        VmError::Agent(_) => SpliceError::Failed("the sandbox's agent did not answer".into()),
        VmError::VmmExited { exit, .. } => SpliceError::Failed(format!("the VM is gone: {exit}")),
        VmError::Api(_) | VmError::NoControlApi => SpliceError::Failed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use roost_proto::agent::ErrorReply;

    use super::*;

    fn refused(kind: ErrorKind) -> VmError {
        VmError::Agent(AgentError::Agent(ErrorReply {
            kind,
            message: "nothing there".into(),
        }))
    }

    #[test]
    fn a_refused_connection_is_a_closed_port_and_other_failures_keep_their_reason() {
        assert_eq!(
            classify(&refused(ErrorKind::ConnectionRefused)),
            SpliceError::PortClosed
        );
        assert_eq!(
            classify(&refused(ErrorKind::Io)),
            SpliceError::Failed("the sandbox's agent refused: nothing there".into())
        );
        assert_eq!(
            classify(&VmError::Agent(AgentError::Closed("connected"))),
            SpliceError::Failed("the sandbox's agent did not answer".into())
        );
    }

    #[tokio::test]
    async fn a_sandbox_without_a_vm_is_not_found() {
        let splicer = VmSplicer::new();
        let id: SandboxId = "cl-novm".parse().unwrap();
        assert_eq!(
            splicer.open(&id, 8080).await.unwrap_err(),
            SpliceError::SandboxNotFound
        );
    }
}
