//! In-memory route cache with push invalidation.
//!
//! Entries live until control says the sandbox changed (or until a TTL, a safety net for a
//! missed event). A fetch that raced with an invalidation must not put the old route back, so
//! every insert carries the invalidation epoch read before its fetch started and is dropped if
//! any invalidation happened since. Hand-written because it is this small and the epoch rule is
//! the point; a general cache crate would hide it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use roost_proto::ids::SandboxId;

use super::Route;

/// An invalidation counter value, taken with [`RouteCache::epoch`] before a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

#[derive(Debug)]
pub struct RouteCache {
    entries: RwLock<HashMap<SandboxId, (Arc<Route>, Instant)>>,
    epoch: AtomicU64,
    ttl: Duration,
    /// False while the event stream is down: invalidations could be missed, so nothing cached
    /// is used and every look-up asks control.
    trusted: AtomicBool,
}

impl RouteCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            ttl,
            trusted: AtomicBool::new(false),
        }
    }

    /// Marks the cache usable (event stream connected) or not (disconnected: cleared too).
    pub fn set_trusted(&self, trusted: bool) {
        if !trusted {
            self.clear();
        }
        self.trusted.store(trusted, Ordering::Release);
    }

    /// The cached route, if the cache is trusted and the entry younger than the TTL.
    pub fn get(&self, sandbox: &SandboxId) -> Option<Arc<Route>> {
        if !self.trusted.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(sandbox)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(route, _)| route.clone())
    }

    /// Read before fetching a route, pass to [`RouteCache::insert`].
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// Caches `route` unless an invalidation happened since `epoch` was read.
    pub fn insert(&self, sandbox: SandboxId, route: Arc<Route>, epoch: Epoch) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        // Checked under the write lock: invalidations bump the epoch under the same lock.
        if self.epoch.load(Ordering::Acquire) == epoch.0 {
            entries.insert(sandbox, (route, Instant::now()));
        }
    }

    /// Forgets one sandbox (it moved, paused, resumed or died).
    pub fn invalidate(&self, sandbox: &SandboxId) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.remove(sandbox);
    }

    /// Forgets everything (the event stream reconnected: events may have been missed).
    pub fn clear(&self) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::RouteState;

    fn route(worker: &str) -> Arc<Route> {
        Arc::new(Route {
            sandbox_id: "cl-a".into(),
            team_id: "t".into(),
            state: RouteState::Running,
            worker_id: Some(worker.into()),
            envd_access_token_sha256: None,
            public: true,
            traffic_access_token_sha256: None,
        })
    }

    fn id() -> SandboxId {
        "cl-a".parse().unwrap()
    }

    #[test]
    fn insert_get_invalidate() {
        let cache = RouteCache::new(Duration::from_secs(60));
        cache.set_trusted(true);
        assert!(cache.get(&id()).is_none());
        cache.insert(id(), route("w1"), cache.epoch());
        assert_eq!(cache.get(&id()).unwrap().worker_id.as_deref(), Some("w1"));
        cache.invalidate(&id());
        assert!(cache.get(&id()).is_none());
        cache.insert(id(), route("w2"), cache.epoch());
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn fetch_racing_an_invalidation_is_not_cached() {
        let cache = RouteCache::new(Duration::from_secs(60));
        cache.set_trusted(true);
        let before_fetch = cache.epoch();
        cache.invalidate(&id()); // the sandbox moved while the old route was being fetched
        cache.insert(id(), route("old"), before_fetch);
        assert!(cache.get(&id()).is_none());
    }

    #[test]
    fn entries_expire() {
        let cache = RouteCache::new(Duration::ZERO);
        cache.set_trusted(true);
        cache.insert(id(), route("w1"), cache.epoch());
        assert!(cache.get(&id()).is_none());
    }

    #[test]
    fn untrusted_cache_answers_nothing() {
        let cache = RouteCache::new(Duration::from_secs(60));
        cache.insert(id(), route("w1"), cache.epoch());
        assert!(cache.get(&id()).is_none());
        cache.set_trusted(true);
        cache.insert(id(), route("w1"), cache.epoch());
        assert!(cache.get(&id()).is_some());
        cache.set_trusted(false);
        assert!(cache.is_empty());
    }
}
