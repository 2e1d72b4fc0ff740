//! Readiness: the agent connects to the host's ready port when it starts and sends its hello.
//! The worker binds the listener before booting the VM and awaits that one frame — no polling.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use roost_proto::agent::muxer::host_listener_path;
use roost_proto::agent::{
    AgentMessage, Frame, FrameCodec, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, READY_PORT,
};
use tokio::net::UnixListener;
use tokio_util::codec::FramedRead;

use crate::{Error, ReadyError};

/// Listens for the agent's hello. Removes its socket file when dropped.
#[derive(Debug)]
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Listens where the VMM delivers guest connections to host port
    /// [`READY_PORT`]: `<uds_path>_1024`.
    pub fn for_vm(uds_path: impl AsRef<Path>) -> Result<Self, ReadyError> {
        Self::bind(host_listener_path(uds_path.as_ref(), READY_PORT))
    }

    /// Listens on `path` (an agent run as a process announces there with `--announce-unix`).
    /// A stale socket file is replaced.
    pub fn bind(path: impl Into<PathBuf>) -> Result<Self, ReadyError> {
        use std::os::unix::fs::FileTypeExt;
        let path = path.into();
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|source| ReadyError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(Self { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for a hello and checks that this worker can talk to the agent.
    /// Connections that do not carry a hello are skipped (any guest process can connect to
    /// the host port; the first valid hello wins).
    pub async fn accept_hello(&self, timeout: Duration) -> Result<Hello, ReadyError> {
        let hello = tokio::time::timeout(timeout, self.first_hello())
            .await
            .map_err(|_| ReadyError::Timeout(timeout))??;
        // Compatible when the version ranges overlap: each request carries the oldest version
        // that has its operation, so an agent without a newer operation still serves the rest
        // (and refuses the newer one with `unsupported_version`).
        if hello.protocol_version < MIN_PROTOCOL_VERSION
            || hello.min_protocol_version > PROTOCOL_VERSION
        {
            return Err(ReadyError::Incompatible {
                min: hello.min_protocol_version,
                max: hello.protocol_version,
                ours: PROTOCOL_VERSION,
            });
        }
        Ok(hello)
    }

    async fn first_hello(&self) -> Result<Hello, ReadyError> {
        loop {
            let (stream, _) = self
                .listener
                .accept()
                .await
                .map_err(|e| ReadyError::Read(Error::Io(e)))?;
            let mut frames = FramedRead::new(stream, FrameCodec::<AgentMessage>::new());
            match tokio::time::timeout(Duration::from_secs(5), frames.next()).await {
                Ok(Some(Ok(Frame::Message(AgentMessage::Hello(hello))))) => return Ok(hello),
                other => tracing::debug!(?other, "ignoring a connection without a hello"),
            }
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
