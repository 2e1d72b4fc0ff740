//! The QUIC endpoint workers dial: accept loop, one task per connection, and the lost-host
//! monitor.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{ChannelConfig, Registry, monitor, session};
use crate::pki::{self, ControlCa, PkiError};
use crate::placement::quic::QuicPlacement;
use crate::store::Db;

/// What the channel's tasks share.
#[derive(Debug)]
pub struct Shared {
    pub db: Db,
    pub registry: Arc<Registry>,
    pub config: ChannelConfig,
    /// Sandboxes with a reconciliation kill order on its way.
    pub kills_in_flight: InFlight,
    /// Signs renewed worker certificates.
    pub ca: ControlCa,
}

/// A set of ids with work in progress.
#[derive(Debug, Default)]
pub struct InFlight(std::sync::Mutex<std::collections::HashSet<String>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // Single insert/remove critical sections: a poisoned set is still consistent.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks `id` in progress; `false` if it already was.
    pub fn begin(&self, id: &str) -> bool {
        self.lock().insert(id.to_owned())
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// Why the channel could not start.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot set up TLS for the worker channel")]
    Pki(#[from] PkiError),
    #[error("cannot bind the worker channel to {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("invalid transport setting")]
    Transport(#[from] quinn::VarIntBoundsExceeded),
}

/// The running worker channel. Dropping it stops accepting and sweeping;
/// [`WorkerChannel::close`] also closes every worker connection.
#[derive(Debug)]
pub struct WorkerChannel {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WorkerChannel {
    /// Binds the endpoint and starts accepting workers and sweeping for lost hosts.
    pub async fn start(
        db: Db,
        ca: &ControlCa,
        config: ChannelConfig,
    ) -> Result<Self, ChannelError> {
        let mut server = pki::server_config(ca, &config.server_name)?;
        let mut transport = quinn::TransportConfig::default();
        // A worker heartbeats far more often than this, so only a dead path hits it.
        transport.max_idle_timeout(Some(
            (config.lost_after + config.heartbeat_interval).try_into()?,
        ));
        server.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(server, config.listen)
            .map_err(|e| ChannelError::Bind(config.listen, e))?;
        let shared = Arc::new(Shared {
            db,
            registry: Arc::new(Registry::new()),
            config,
            kills_in_flight: InFlight::default(),
            ca: ca.try_clone()?,
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        let sweep = monitor::spawn(shared.clone(), shared.config.sweep_interval());
        tracing::info!(addr = ?endpoint.local_addr().ok(), "worker channel listening");
        Ok(Self {
            endpoint,
            shared,
            tasks: vec![accept, sweep],
        })
    }

    /// The bound UDP address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.shared.registry
    }

    pub fn config(&self) -> &ChannelConfig {
        &self.shared.config
    }

    /// A placement that runs sandboxes on this channel's workers.
    pub fn placement(&self) -> QuicPlacement {
        QuicPlacement::new(
            self.shared.registry.clone(),
            self.shared.config.request_timeout,
        )
    }

    /// Stops accepting, closes every worker connection and stops the monitor.
    pub fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(session::close_code::NORMAL),
            b"control shutting down",
        );
    }

    /// Waits until every connection has finished closing (after [`Self::close`]).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl Drop for WorkerChannel {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(connection) => session::run(shared, connection).await,
                // Includes client certificates the CA did not sign.
                Err(e) => tracing::info!(error = %e, "worker handshake failed"),
            }
        });
    }
}
