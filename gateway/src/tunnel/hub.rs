//! [`TunnelHub`]: accepts worker connections and opens streams to sandbox ports through them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use roost_proto::SandboxId;
use roost_proto::quic_stream::QuicStream;
use roost_proto::tunnel::{Status, StreamHeader};

use super::registry::{self, Registry};
use super::{
    BrokenReason, HubError, TunnelError, TunnelHubConfig, TunnelStream, endpoint,
    worker_id_from_cert,
};

/// The gateway's tunnel endpoint. Cheap to clone; every clone is the same endpoint. Dropping
/// the last clone does not stop it: call [`TunnelHub::close`].
#[derive(Debug, Clone)]
pub struct TunnelHub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoint: quinn::Endpoint,
    registry: Registry,
    open_timeout: Duration,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TunnelHub {
    /// Binds the endpoint and starts accepting workers. Must be called inside a tokio runtime
    /// that outlives the hub (it drives the endpoint and every connection); streams may be
    /// opened and used from any runtime.
    pub fn bind(config: TunnelHubConfig) -> Result<Self, HubError> {
        let endpoint = endpoint::bind(&config)?;
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| Inner {
            accept: tokio::spawn(accept_loop(endpoint.clone(), weak.clone())),
            endpoint,
            registry: Registry::default(),
            open_timeout: config.open_timeout,
        });
        tracing::info!(addr = ?inner.endpoint.local_addr().ok(), "tunnel endpoint listening");
        Ok(Self { inner })
    }

    /// The bound UDP address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Ids of the workers connected now, sorted.
    pub fn workers(&self) -> Vec<String> {
        self.inner.registry.workers()
    }

    /// Whether `worker_id` has a tunnel to this gateway now.
    pub fn is_connected(&self, worker_id: &str) -> bool {
        self.inner.registry.get(worker_id).is_some()
    }

    /// Waits up to `timeout` for `worker_id` to be connected; `false` if it was not by then.
    pub async fn wait_for_worker(&self, worker_id: &str, timeout: Duration) -> bool {
        let mut changes = self.inner.registry.subscribe();
        let wait = async {
            while !self.is_connected(worker_id) {
                if changes.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Opens a stream to `port` in `sandbox_id` through `worker_id`'s tunnel and waits for the
    /// worker to connect it (one round trip to the worker, bounded by the open timeout).
    pub async fn open(
        &self,
        worker_id: &str,
        sandbox_id: &SandboxId,
        port: u16,
    ) -> Result<TunnelStream, TunnelError> {
        let connection = self
            .inner
            .registry
            .get(worker_id)
            .ok_or_else(|| TunnelError::NoWorker(worker_id.to_owned()))?;
        let broken = |reason: BrokenReason| TunnelError::Broken {
            worker_id: worker_id.to_owned(),
            reason,
        };
        let timeout = self.inner.open_timeout;
        let status = tokio::time::timeout(timeout, open_stream(&connection, sandbox_id, port))
            .await
            .map_err(|_| broken(BrokenReason::Timeout(timeout)))?;
        let (stream, status) = match status {
            Ok(opened) => opened,
            Err(reason) => {
                if let BrokenReason::Connection(_) = reason {
                    self.inner.registry.remove(worker_id, &connection);
                }
                return Err(broken(reason));
            }
        };
        match status {
            Status::Ok => Ok(stream),
            Status::SandboxNotFound => Err(TunnelError::SandboxNotFound {
                worker_id: worker_id.to_owned(),
                sandbox_id: sandbox_id.clone(),
            }),
            Status::PortClosed => Err(TunnelError::PortClosed {
                sandbox_id: sandbox_id.clone(),
                port,
            }),
            Status::Error(message) => Err(broken(BrokenReason::Worker(message))),
        }
    }

    /// Stops accepting and closes every worker connection (their streams fail at once).
    pub fn close(&self) {
        self.inner.accept.abort();
        self.inner
            .endpoint
            .close(registry::SHUTDOWN, b"gateway shutting down");
    }

    /// Waits until every connection has finished closing (after [`Self::close`]).
    pub async fn wait_idle(&self) {
        self.inner.endpoint.wait_idle().await;
    }
}

async fn open_stream(
    connection: &quinn::Connection,
    sandbox_id: &SandboxId,
    port: u16,
) -> Result<(QuicStream, Status), BrokenReason> {
    let (mut send, recv) = connection.open_bi().await?;
    let header = StreamHeader::new(sandbox_id.clone(), port).encode();
    send.write_all(&header).await?;
    let mut stream = QuicStream::new(send, recv);
    let status = Status::read(&mut stream).await?;
    Ok((stream, status))
}

async fn accept_loop(endpoint: quinn::Endpoint, hub: std::sync::Weak<Inner>) {
    while let Some(incoming) = endpoint.accept().await {
        let hub = hub.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                // Includes client certificates the worker CA did not sign, and no certificate.
                Err(e) => {
                    tracing::info!(error = %e, "tunnel handshake failed");
                    return;
                }
            };
            let worker_id = match roost_proto::tls::peer_leaf(&connection)
                .ok_or(super::IdentityError::NoCertificate)
                .and_then(|leaf| worker_id_from_cert(&leaf))
            {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(error = %e, remote = %connection.remote_address(), "refusing tunnel");
                    connection.close(quinn::VarInt::from_u32(3), b"no worker identity");
                    return;
                }
            };
            let Some(inner) = hub.upgrade() else { return };
            tracing::info!(worker_id, remote = %connection.remote_address(), "worker tunnel up");
            inner.registry.insert(&worker_id, connection.clone());
            drop(inner);
            let reason = connection.closed().await;
            tracing::info!(worker_id, %reason, "worker tunnel down");
            if let Some(inner) = hub.upgrade() {
                inner.registry.remove(&worker_id, &connection);
            }
        });
    }
}
