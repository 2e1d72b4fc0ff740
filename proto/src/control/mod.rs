//! The control channel: how a worker and the control plane talk over QUIC with mutual TLS.
//!
//! # Shape
//! The worker dials control (so a worker behind NAT needs no inbound port) and authenticates
//! with the client certificate it obtained at registration. On the connection:
//! - **one long-lived session stream**, a bidirectional stream the worker opens first. It sends
//!   [`WorkerMessage::Hello`] (identity, version, capacity, templates, every sandbox it holds);
//!   control answers [`ControlMessage::Welcome`] (or [`ControlMessage::Rejected`] and closes),
//!   then the worker sends a [`WorkerMessage::Heartbeat`] every `heartbeat_interval_ms`.
//! - **one bidirectional stream per request** from control to the worker: control opens it,
//!   writes one [`Request`] and finishes its side; the worker writes one [`Response`] and
//!   finishes.
//! - **one bidirectional stream per worker request** (after the welcome), the other way round:
//!   the worker opens it, writes one [`WorkerRequest`] (e.g. certificate renewal) and control
//!   answers one [`WorkerReply`].
//!
//! # Why a stream per request and one stream for heartbeats
//! QUIC streams are cheap and independent: a slow create (a cold boot can take seconds) does not
//! hold up a kill behind it, as it would on one shared stream, and no request-id multiplexer is
//! needed: the stream *is* the correlation (the `request_id` is still carried, for logs and
//! idempotence on the worker). Heartbeats, on the other hand, are one ordered sequence whose
//! silence is the signal, so they share one stream whose end means "the worker left"; putting
//! hello and heartbeats on the same stream also guarantees the first heartbeat follows the
//! hello.
//!
//! # Framing ([`codec`])
//! Every message is a `u32` big-endian length followed by that many bytes of JSON; lengths above
//! [`MAX_MESSAGE_LEN`] are refused without buffering. JSON for the same reason as the agent
//! protocol: messages are small and few, unknown fields are ignored and `#[serde(default)]`
//! fields may be added without a version bump, and a capture is readable.
//!
//! # Versions
//! The hello and every request carry the sender's [`PROTOCOL_VERSION`]. Control accepts workers
//! from [`MIN_PROTOCOL_VERSION`] up to its own version and rejects others in
//! [`ControlMessage::Rejected`]; a worker answers a request of a version it does not speak with
//! [`ErrorKind::UnsupportedVersion`]. Compatible additions keep the version.

pub mod codec;
pub mod messages;

pub use codec::{CodecError, JsonCodec};
pub use messages::{
    Capacity, ControlMessage, CreateSandbox, ErrorKind, Heartbeat, Hello, MetricSample, Operation,
    Outcome, Request, Response, SandboxReport, Usage, WorkerError, WorkerMessage, WorkerOperation,
    WorkerOutcome, WorkerReply, WorkerRequest, WorkerSandboxState,
};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Largest encoded message either side accepts (1 MiB: a heartbeat listing ~5,000 sandboxes).
pub const MAX_MESSAGE_LEN: usize = 1024 * 1024;

/// ALPN protocol id of the control channel, so that a TLS peer of another kind cannot be
/// mistaken for a worker.
pub const ALPN: &[u8] = b"roost-control/1";
