//! The worker ↔ agent protocol: how a worker talks to the roost-agent inside a microVM over
//! virtio-vsock.
//!
//! # Shape
//! One vsock connection per operation, no multiplexing: the host connects to the guest's
//! [`AGENT_PORT`], sends one [`Request`] frame, then the operation's own frames follow (see
//! [`messages`] for each operation's sequence). Closing the connection ends the operation (an
//! exec whose connection drops has its process group killed). A port-forward connection
//! switches to raw bytes in both directions after the agent's [`AgentMessage::Connected`].
//! The guest announces itself by connecting to host [`READY_PORT`] and sending one
//! [`AgentMessage::Hello`], so the worker learns "ready" without polling.
//!
//! # Framing ([`frame`])
//! `u32` big-endian length, then a one-byte tag, then the payload; the length counts tag and
//! payload and may not exceed [`MAX_FRAME_LEN`]. Tag 0 carries a control message, tags 1–4 raw
//! bytes of one stream (stdin, stdout, stderr, file content).
//!
//! # Why JSON for control messages and raw bytes for data
//! Control messages are small and few (a handful per operation), so their encoding cost does
//! not matter, while being self-describing does: serde_json ignores unknown fields and fills
//! `#[serde(default)]` ones, so either side can add optional fields without a version bump,
//! unknown error kinds decode as [`ErrorKind::Other`], and a frame can be read in a hex dump.
//! Bulk data (process output, file content) never passes through JSON: data frames carry the
//! bytes as they are, so there is no base64 or per-byte cost. A compact binary format (postcard,
//! bincode) would save microseconds on headers but would make every added field a breaking
//! change.
//!
//! # Versions
//! Every request carries the oldest protocol version that has its operation
//! ([`Operation::required_version`], at most [`PROTOCOL_VERSION`]); the agent serves requests
//! from [`MIN_PROTOCOL_VERSION`] to its own version and answers others with
//! [`ErrorKind::UnsupportedVersion`]. Its hello carries both bounds, so the worker can refuse
//! an agent it cannot talk to before sending anything. Compatible additions (new optional
//! fields, new error kinds) keep the version; new operations or changed meanings raise it.

pub mod envd_init;
pub mod frame;
pub mod identity;
pub mod messages;
pub mod muxer;

pub use envd_init::InitRequest;
pub use frame::{Frame, FrameCodec, FrameError, StreamKind};
pub use identity::{IdentityApplied, IdentityRequest};
pub use messages::{
    AgentMessage, ClientMessage, ErrorKind, ErrorReply, ExecRequest, ExitStatus, ForwardRequest,
    Health, Hello, MemoryInfo, Operation, Program, ReadFileRequest, Request, UserSpec,
    WriteFileRequest,
};

/// The protocol version this build speaks. 2 added forwarding to the envd init socket
/// ([`ForwardRequest::EnvdInit`]), 3 the identity operation ([`IdentityRequest`]).
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest protocol version this build still serves.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Guest vsock port the agent listens on for operations.
pub const AGENT_PORT: u32 = 1025;
/// Host vsock port (CID 2) the agent connects to when it starts, to send its hello. With the
/// VMM's Unix-socket vsock, the worker listens on `<uds_path>_1024`.
pub const READY_PORT: u32 = 1024;

/// Largest frame body (tag and payload) either side accepts. A longer length prefix is a
/// protocol error: the receiver answers with an error and closes the connection.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Largest data payload senders put in one frame (process output, file content, stdin). Kept
/// well below [`MAX_FRAME_LEN`] so that streams interleave finely.
pub const MAX_CHUNK_LEN: usize = 128 * 1024;
