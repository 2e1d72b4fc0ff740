//! Worker id → its current tunnel connection. A worker that connects again replaces (and
//! closes) its previous connection; a closing connection removes itself only if it is still
//! the current one.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

/// Close code sent to a connection that a newer one from the same worker replaced.
pub const REPLACED: quinn::VarInt = quinn::VarInt::from_u32(2);
/// Close code sent to every connection when the gateway shuts down.
pub const SHUTDOWN: quinn::VarInt = quinn::VarInt::from_u32(0);

#[derive(Debug)]
pub struct Registry {
    connections: Mutex<HashMap<String, quinn::Connection>>,
    /// Bumped on every change, so waiters can watch for a worker to arrive.
    changes: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            connections: Mutex::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, quinn::Connection>> {
        // Every critical section is one map operation: a poisoned map is still consistent.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `connection` the one for `worker_id`, closing the one it replaces.
    pub fn insert(&self, worker_id: &str, connection: quinn::Connection) {
        let old = self.lock().insert(worker_id.to_owned(), connection);
        if let Some(old) = old {
            tracing::info!(worker_id, "worker reconnected; closing its previous tunnel");
            old.close(REPLACED, b"replaced by a newer connection");
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Forgets `connection` if it is still the current one for `worker_id`.
    pub fn remove(&self, worker_id: &str, connection: &quinn::Connection) {
        let mut map = self.lock();
        if map
            .get(worker_id)
            .is_some_and(|c| c.stable_id() == connection.stable_id())
        {
            map.remove(worker_id);
            drop(map);
            self.changes.send_modify(|n| *n += 1);
        }
    }

    pub fn get(&self, worker_id: &str) -> Option<quinn::Connection> {
        self.lock().get(worker_id).cloned()
    }

    /// Connected worker ids, sorted.
    pub fn workers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
