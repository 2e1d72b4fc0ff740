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
        VmError::Api(_) | VmError::NoControlApi | VmError::Identity(_) => {
            SpliceError::Failed(error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Duration;

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
        let splicer = VmSplicer::new();
        let id: SandboxId = "cl-vm1".parse().unwrap();
        splicer.insert(id.clone(), vm.clone());

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
        let removed = splicer.remove(&id).unwrap();
        assert_eq!(
            splicer.open(&id, port).await.unwrap_err(),
            SpliceError::SandboxNotFound
        );
        drop(stream);
        drop(removed);
        let vm = Arc::try_unwrap(vm).unwrap();
        vm.kill();
    }

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
