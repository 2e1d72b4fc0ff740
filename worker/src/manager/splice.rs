//! [`SandboxSplicer`]: the gateway tunnel's way into the manager's running sandboxes. It opens
//! a stream through the in-guest agent's port forward (`VmHandle::forward_port`, a vsock
//! connection the agent joins to `127.0.0.1:PORT` inside the guest). It is fed by the manager
//! ([`Routes`]) and rides out the moments right after a restore (create or
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

/// The tunnel's view of a failed forward: the agent's "connection refused" means the port is
/// closed; everything else is reported with its reason.
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
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use futures::{SinkExt, StreamExt};
    use roost_proto::agent::{
        AgentMessage, ErrorReply, ForwardRequest, Frame, FrameCodec, Hello, Operation,
        PROTOCOL_VERSION, Request,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UnixListener};
    use tokio_util::codec::{Framed, FramedWrite};

    use super::*;
    use crate::vm_handle::VmHandleConfig;

    /// A VM whose "VMM" is `sleep` and whose agent the test plays: it announces itself, and
    /// answers forwards on the vsock socket as the real muxer + agent do (`CONNECT` line,
    /// forward request, `Connected` or "connection refused", then raw bytes to a local port).
    async fn fake_vm_forwarding_to(root: &Path, open_port: u16) -> VmHandle {
        let vmm = root.join("roost");
        std::fs::write(&vmm, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("vmlinux"), b"elf").unwrap();
        std::fs::write(root.join("rootfs.ext4"), b"ext4").unwrap();
        let runtime = root.join("vm");
        let mut config =
            VmHandleConfig::new(root.join("vmlinux"), root.join("rootfs.ext4"), &runtime);
        config.vmm_binary = vmm;
        config.ready_timeout = Duration::from_secs(20);
        let announcer = tokio::spawn(async move {
            let path = runtime.join("vsock.sock_1024");
            let stream = loop {
                if let Ok(stream) = tokio::net::UnixStream::connect(&path).await {
                    break stream;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let hello = Hello {
                protocol_version: PROTOCOL_VERSION,
                min_protocol_version: PROTOCOL_VERSION,
                agent_version: "test".into(),
                hostname: "fake".into(),
            };
            FramedWrite::new(stream, FrameCodec::<AgentMessage>::new())
                .send(Frame::Message(AgentMessage::Hello(hello)))
                .await
                .unwrap();
        });
        let vm = VmHandle::boot(config).await.unwrap();
        announcer.await.unwrap();
        let muxer = UnixListener::bind(vm.runtime_dir().join("vsock.sock")).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = muxer.accept().await.unwrap();
                tokio::spawn(play_agent(stream, open_port));
            }
        });
        vm
    }

    async fn play_agent(mut stream: tokio::net::UnixStream, open_port: u16) {
        let mut line = Vec::new();
        while line.last() != Some(&b'\n') {
            line.push(stream.read_u8().await.unwrap());
        }
        assert_eq!(line, b"CONNECT 1025\n");
        stream.write_all(b"OK 1073741824\n").await.unwrap();
        let mut framed = Framed::new(stream, FrameCodec::<Request>::new());
        let Some(Ok(Frame::Message(Request {
            op: Operation::Forward(ForwardRequest::Tcp { port }),
            ..
        }))) = framed.next().await
        else {
            panic!("expected a forward request");
        };
        if port != open_port {
            let refused = ErrorReply::new(ErrorKind::ConnectionRefused, "connection refused");
            let _ = framed
                .send(Frame::Message(AgentMessage::Error(refused)))
                .await;
            return;
        }
        framed
            .send(Frame::Message(AgentMessage::Connected))
            .await
            .unwrap();
        let parts = framed.into_parts();
        assert!(parts.read_buf.is_empty());
        let mut host = parts.io;
        let mut guest = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
    }

    #[tokio::test]
    async fn streams_reach_a_port_in_the_vm_through_the_agent_forward() {
        let root = tempfile::tempdir().unwrap();
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let vm = Arc::new(fake_vm_forwarding_to(root.path(), port).await);
        let splicer = SandboxSplicer::new();
        let id: SandboxId = "cl-vm1".parse().unwrap();
        splicer.up(id.as_str(), vm.clone());

        let mut stream = splicer.open(&id, port).await.unwrap();
        stream.write_all(b"through the agent").await.unwrap();
        let mut back = [0u8; 17];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"through the agent");

        assert_eq!(
            splicer
                .open(&id, port.wrapping_add(1).max(1))
                .await
                .unwrap_err(),
            SpliceError::PortClosed
        );
        splicer.down(id.as_str());
        assert_eq!(
            splicer.open(&id, port).await.unwrap_err(),
            SpliceError::SandboxNotFound
        );
        drop(stream);
        let vm = Arc::try_unwrap(vm).unwrap();
        vm.kill();
    }

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
        let io = VmError::Agent(AgentError::Agent(ErrorReply {
            kind: ErrorKind::Io,
            message: "nothing there".into(),
        }));
        assert!(!no_agent_yet(&io));
        assert_eq!(
            classify(&io),
            SpliceError::Failed("the sandbox's agent refused: nothing there".into())
        );
    }
}
