//! The control channel's server side: workers dial in over QUIC with mutual TLS.
//!
//! - [`server`]: the QUIC endpoint and its accept loop ([`WorkerChannel`]);
//! - [`session`]: one connection, from certificate check and hello to its last heartbeat;
//! - [`registry`]: the connected workers, their capacity and templates (placement reads it);
//! - [`rpc`]: one request on its own stream, with a timeout;
//! - [`requests`]: requests the worker makes of control (certificate renewal);
//! - [`reconcile`]: matching what a worker reports against the database;
//! - [`monitor`]: marking hosts whose heartbeats stopped lost, with their sandboxes;
//! - [`client`]: the worker's end (dial, hello, heartbeats, answering requests).
//!
//! The wire format is `roost_proto::control`. Liveness is decided from the database
//! (`hosts.last_heartbeat_at`), not from connection state: a closed connection only stops
//! placements on the host, and the host and its sandboxes become lost only when no heartbeat
//! arrived for [`ChannelConfig::lost_after`]. That keeps one rule for every way a worker can
//! disappear (crash, network cut, hung process, control restart) and lets a worker that
//! restarts quickly keep its sandboxes.

pub mod client;
pub mod monitor;
pub mod reconcile;
pub mod registry;
pub mod requests;
pub mod rpc;
pub mod server;
pub mod session;

use std::net::SocketAddr;
use std::time::Duration;

pub use registry::Registry;
pub use server::{ChannelError, WorkerChannel};

/// Settings of the worker channel.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// DNS name in control's server certificate; workers connect with this name.
    pub server_name: String,
    /// How often workers send heartbeats (told to them in the welcome).
    pub heartbeat_interval: Duration,
    /// A host without a heartbeat for this long is lost, with its sandboxes.
    pub lost_after: Duration,
    /// Longest wait for a worker's answer to one request.
    pub request_timeout: Duration,
    /// Longest wait for a new connection's hello.
    pub hello_timeout: Duration,
}

impl ChannelConfig {
    /// Production defaults: heartbeats every 5 s, lost after 20 s without one.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            server_name: "control.roost.internal".to_owned(),
            heartbeat_interval: Duration::from_secs(5),
            lost_after: Duration::from_secs(20),
            request_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(10),
        }
    }

    /// How often the monitor looks for silent hosts: a host is marked lost at most
    /// `lost_after + sweep_interval()` after its last heartbeat.
    pub fn sweep_interval(&self) -> Duration {
        (self.lost_after / 4).max(Duration::from_millis(10))
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
