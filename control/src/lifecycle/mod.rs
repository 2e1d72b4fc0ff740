//! Sandbox lifecycle: the pure state machine ([`state`]), the operations that drive it
//! against the store and a worker ([`service`], [`snapshots`]), and the timeout reaper ([`reaper`]).

pub mod reaper;
pub mod service;
pub mod snapshots;
pub mod state;

pub use service::{Connected, CreateRequest, LifecycleError, Sandboxes};
pub use state::SandboxState;
