//! Wire types shared by Roost's control plane, gateway and workers.
//!
//! Everything that crosses a process boundary between Roost components is defined here, so
//! that the three services cannot drift apart. Today this is the identifier scheme; the
//! control channel, tunnel headers and framing join it as those parts are built.

pub mod agent;
pub mod control;
pub mod egress;
pub mod ids;
#[cfg(feature = "tls")]
pub mod quic_stream;
#[cfg(feature = "tls")]
pub mod tls;
pub mod tunnel;
pub mod vmm_api;

pub use ids::{IdError, SandboxId};
