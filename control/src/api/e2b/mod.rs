//! The E2B-compatible sandbox API (see shared/design/E2B-COMPAT.md): the exact paths, status
//! codes and JSON keys the official SDKs use. Request bodies are lenient (the SDKs send fields
//! we do not use yet); responses always carry every key the SDKs pop.
//!
//! E2B knows only `running` and `paused`: a sandbox being created is shown as running, and a
//! lost or killed one does not exist here (404), though it can still be killed.

pub mod routes;
pub mod snapshots;
pub mod types;
