//! Where the channel listens and announces: AF_VSOCK inside a VM, a Unix socket when the agent
//! runs as an ordinary process (tests, development). Both give byte streams; the protocol
//! above them is the same.

use std::fmt;
use std::io;
use std::path::PathBuf;

use roost_proto::agent::{AGENT_PORT, READY_PORT};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio_vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VsockAddr, VsockListener, VsockStream};

/// A connection, whatever carries it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Where operations arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Vsock { port: u32 },
    Unix(PathBuf),
}

impl Default for Listen {
    fn default() -> Self {
        Self::Vsock { port: AGENT_PORT }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { port } => write!(f, "vsock port {port}"),
            Self::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Where the agent sends its hello when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announce {
    Vsock {
        cid: u32,
        port: u32,
    },
    Unix(PathBuf),
    /// Nobody to tell (the worker asks `hello` itself).
    Nowhere,
}

impl Default for Announce {
    fn default() -> Self {
        Self::Vsock {
            cid: VMADDR_CID_HOST,
            port: READY_PORT,
        }
    }
}

impl fmt::Display for Announce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Nowhere => f.write_str("nowhere"),
        }
    }
}

impl Announce {
    /// Connects to the announcement listener.
    pub async fn connect(&self) -> io::Result<Box<dyn Io>> {
        Ok(match self {
            Self::Vsock { cid, port } => {
                Box::new(VsockStream::connect(VsockAddr::new(*cid, *port)).await?)
            }
            Self::Unix(path) => Box::new(UnixStream::connect(path).await?),
            Self::Nowhere => return Err(io::Error::other("no announcement address")),
        })
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Vsock(VsockListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds. A stale Unix socket file at the path (left by a killed agent) is replaced.
    pub fn bind(listen: &Listen) -> io::Result<Self> {
        match listen {
            Listen::Vsock { port } => Ok(Self::Vsock(VsockListener::bind(VsockAddr::new(
                VMADDR_CID_ANY,
                *port,
            ))?)),
            Listen::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
                Ok(Self::Unix(UnixListener::bind(path)?))
            }
        }
    }

    pub async fn accept(&self) -> io::Result<Box<dyn Io>> {
        Ok(match self {
            Self::Vsock(listener) => Box::new(listener.accept().await?.0),
            Self::Unix(listener) => Box::new(listener.accept().await?.0),
        })
    }
}
