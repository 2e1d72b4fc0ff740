//! The worker's end of the gateway tunnels: dial every gateway over QUIC with the worker's
//! certificate, keep the connections up (re-dialling with backoff), and for each stream a
//! gateway opens, splice it into the sandbox port its header names.
//!
//! The worker dials out, so it needs no inbound port. The header ([`roost_proto::tunnel`]) is
//! only a request: a [`Splicer`] looks the sandbox up in this worker's own table and answers
//! "not found" for anything else. The worker's sandboxes are reached through
//! `manager::SandboxSplicer` (the agent's vsock port forward); [`TcpSplicer`] reaches servers
//! by address (local servers in tests). See `docs/tunnel.md`.

mod client;
mod splicer;
mod stream;

pub use client::{ClientError, GatewayTarget, TunnelClient, TunnelClientConfig};
pub use splicer::{SpliceError, Splicer, TcpSplicer};
