//! The change feed: every write that changes where or whether a sandbox can be reached
//! (insert, every state compare-and-set) announces the sandbox on an in-process broadcast.
//!
//! # Why in the store
//! Sandbox state changes come from many places (REST operations, the reaper, the lost-host
//! monitor, reconciliation). They all go through [`super::sandboxes::insert`] and
//! [`super::sandboxes::compare_and_set`], so announcing there means no path can forget to:
//! the gateway's route cache is invalidated for creates, kills, pauses, resumes, timeouts and
//! lost hosts alike. Consumers (the gateway's event stream, the Redis publisher) subscribe with
//! [`super::Db::subscribe_changes`]; a subscriber that falls behind learns it (`Lagged`) and must
//! resynchronise, so a change is never silently dropped.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// How many changes a slow subscriber may fall behind before it must resynchronise.
const CAPACITY: usize = 4096;

/// What happened to a sandbox's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Its state or host changed: look it up again.
    Changed,
    /// It was killed: it will never be routable again.
    Removed,
}

/// One sandbox whose route changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SandboxChange {
    pub sandbox_id: String,
    pub kind: ChangeKind,
}

/// The sending side, held by [`super::Db`].
#[derive(Debug, Clone)]
pub(crate) struct Feed(broadcast::Sender<SandboxChange>);

impl Feed {
    pub(crate) fn new() -> Self {
        Self(broadcast::channel(CAPACITY).0)
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<SandboxChange> {
        self.0.subscribe()
    }

    /// Announces a change; nobody listening is fine.
    pub(crate) fn send(&self, sandbox_id: &str, kind: ChangeKind) {
        let _ = self.0.send(SandboxChange {
            sandbox_id: sandbox_id.to_owned(),
            kind,
        });
    }
}
