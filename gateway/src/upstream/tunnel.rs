//! The production [`SandboxDialer`]: a stream through the hosting worker's QUIC tunnel
//! ([`TunnelHub::open`]). The worker's answer (sandbox not found, port not open) maps one to
//! one onto the dial errors the proxy turns into the contract's replies.

use async_trait::async_trait;
use roost_proto::ids::SandboxId;

use super::{DialError, SandboxDialer, UpstreamIo};
use crate::report::error_chain;
use crate::tunnel::{TunnelError, TunnelHub};

#[async_trait]
impl SandboxDialer for TunnelHub {
    async fn dial(
        &self,
        worker_id: &str,
        sandbox: &SandboxId,
        port: u16,
    ) -> Result<Box<dyn UpstreamIo>, DialError> {
        match self.open(worker_id, sandbox, port).await {
            Ok(stream) => Ok(Box::new(stream)),
            Err(TunnelError::NoWorker(worker)) => Err(DialError::NoWorker(worker)),
            Err(TunnelError::SandboxNotFound { .. }) => Err(DialError::SandboxNotFound),
            Err(TunnelError::PortClosed { .. }) => Err(DialError::PortClosed),
            Err(error @ TunnelError::Broken { .. }) => Err(DialError::Broken(error_chain(&error))),
        }
    }
}
