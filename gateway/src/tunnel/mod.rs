//! The gateway's end of the worker tunnels: a QUIC endpoint that workers dial with mutual TLS,
//! a registry of their connections, and [`TunnelHub::open`], which opens one stream to a port
//! inside a sandbox for each proxied client connection.
//!
//! Workers dial out (a worker behind NAT needs no inbound port) and present the client
//! certificate control issued at registration; the hub trusts control's worker CA and takes the
//! worker id from the certificate (SAN `urn:roost:worker:<id>`, else the CN), never from
//! anything the worker says. A worker that reconnects replaces its previous connection. The
//! stream protocol (header, status, raw bytes) is [`roost_proto::tunnel`]; `docs/tunnel.md`
//! describes the whole design.
//!
//! ```no_run
//! # async fn demo(config: roost_gateway::tunnel::TunnelHubConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use roost_gateway::tunnel::TunnelHub;
//! use tokio::io::AsyncWriteExt;
//!
//! let hub = TunnelHub::bind(config)?;
//! let mut stream = hub.open("wrk_1", &"cl-abc".parse()?, 8080).await?;
//! stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
//! # Ok(()) }
//! ```

mod config;
mod endpoint;
mod error;
mod hub;
mod identity;
mod registry;

pub use config::{SECRET_LEN, TunnelHubConfig, load_or_create_secret};
pub use error::{BrokenReason, HubError, TunnelError};
pub use hub::TunnelHub;
pub use identity::{IdentityError, worker_id_from_cert};

/// A proxied connection to a port inside a sandbox: raw bytes both ways. Shutting down the
/// write half finishes the QUIC stream (the sandbox's server sees end-of-file); dropping it
/// before that resets the stream, so the sandbox's server sees the connection cut.
pub type TunnelStream = roost_proto::quic_stream::QuicStream;
