//! An in-process worker that answers every request at once and runs nothing.
//!
//! It keeps the set of sandboxes it was told about, so that it behaves like a real worker at
//! the protocol level (pausing an unknown sandbox fails), and it can be told to refuse the
//! next creates, which lets tests exercise placement failures. It registers one host row.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use roost_proto::SandboxId;

use super::{MetricSample, Placed, Placement, PlacementError, SandboxSpec};
use crate::store::{self, Db, StoreError};

/// Host id under which the instant worker registers.
pub const HOST_ID: &str = "host-instant";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerState {
    Running,
    Paused,
}

#[derive(Debug)]
struct Held {
    state: WorkerState,
    cpu_count: i64,
    memory_mb: i64,
    disk_size_mb: i64,
}

#[derive(Debug, Default)]
pub struct InstantWorker {
    sandboxes: Mutex<HashMap<SandboxId, Held>>,
    /// Snapshots taken here (they hold nothing: no VM ran).
    snapshots: Mutex<std::collections::HashSet<String>>,
    refuse_creates: AtomicUsize,
}

impl InstantWorker {
    /// Registers the worker's host in `db` and returns it.
    pub async fn register(db: &Db) -> Result<Self, StoreError> {
        store::hosts::upsert_ready(db, HOST_ID, "in-process instant worker", 64, 256 * 1024)
            .await?;
        Ok(Self::default())
    }

    /// Makes the next `n` creates fail with [`PlacementError::NoCapacity`].
    pub fn refuse_next_creates(&self, n: usize) {
        self.refuse_creates.store(n, Ordering::SeqCst);
    }

    /// How many sandboxes the worker holds, running or paused.
    pub fn held(&self) -> usize {
        self.lock().len()
    }

    /// Whether the worker holds snapshot `id`.
    pub fn holds_snapshot(&self, id: &str) -> bool {
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Held>> {
        // A panic while holding this lock cannot leave the map half-updated (every critical
        // section is a single map operation), so a poisoned lock is still consistent.
        self.sandboxes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_host(host_id: &str) -> Result<(), PlacementError> {
        if host_id == HOST_ID {
            Ok(())
        } else {
            Err(PlacementError::HostUnavailable {
                host: host_id.to_owned(),
            })
        }
    }

    fn unknown(id: &SandboxId) -> PlacementError {
        PlacementError::UnknownSandbox {
            host: HOST_ID.to_owned(),
            sandbox: id.as_str().to_owned(),
        }
    }
}

#[async_trait]
impl Placement for InstantWorker {
    async fn create(&self, spec: &SandboxSpec) -> Result<Placed, PlacementError> {
        let refused = self
            .refuse_creates
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(PlacementError::NoCapacity {
                template: spec.template_id.clone(),
            });
        }
        self.lock().insert(
            spec.id.clone(),
            Held {
                state: WorkerState::Running,
                cpu_count: spec.cpu_count,
                memory_mb: spec.memory_mb,
                disk_size_mb: spec.disk_size_mb,
            },
        );
        Ok(Placed {
            host_id: HOST_ID.to_owned(),
        })
    }

    async fn kill(&self, host_id: &str, id: &SandboxId) -> Result<(), PlacementError> {
        Self::check_host(host_id)?;
        self.lock()
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Self::unknown(id))
    }

    async fn pause(&self, host_id: &str, id: &SandboxId) -> Result<(), PlacementError> {
        Self::check_host(host_id)?;
        let mut map = self.lock();
        let held = map.get_mut(id).ok_or_else(|| Self::unknown(id))?;
        if held.state != WorkerState::Running {
            return Err(PlacementError::Refused {
                reason: "sandbox is not running".into(),
            });
        }
        held.state = WorkerState::Paused;
        Ok(())
    }

    async fn resume(&self, host_id: &str, spec: &SandboxSpec) -> Result<Placed, PlacementError> {
        Self::check_host(host_id)?;
        let mut map = self.lock();
        let held = map
            .get_mut(&spec.id)
            .ok_or_else(|| Self::unknown(&spec.id))?;
        if held.state != WorkerState::Paused {
            return Err(PlacementError::Refused {
                reason: "sandbox is not paused".into(),
            });
        }
        held.state = WorkerState::Running;
        Ok(Placed {
            host_id: HOST_ID.to_owned(),
        })
    }

    async fn metrics(
        &self,
        host_id: &str,
        id: &SandboxId,
    ) -> Result<Vec<MetricSample>, PlacementError> {
        Self::check_host(host_id)?;
        let map = self.lock();
        let held = map.get(id).ok_or_else(|| Self::unknown(id))?;
        // Nothing runs, so usage is zero against the sandbox's real allocation.
        Ok(vec![MetricSample {
            timestamp_ms: store::now_ms(),
            cpu_count: held.cpu_count,
            cpu_used_pct: 0.0,
            mem_used: 0,
            mem_total: held.memory_mb.saturating_mul(1024 * 1024),
            mem_cache: 0,
            disk_used: 0,
            disk_total: held.disk_size_mb.saturating_mul(1024 * 1024),
        }])
    }

    async fn snapshot(
        &self,
        host_id: &str,
        id: &SandboxId,
        snapshot_id: &str,
    ) -> Result<u64, PlacementError> {
        Self::check_host(host_id)?;
        let map = self.lock();
        let held = map.get(id).ok_or_else(|| Self::unknown(id))?;
        if held.state != WorkerState::Running {
            return Err(PlacementError::Refused {
                reason: "sandbox is not running".into(),
            });
        }
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(snapshot_id.to_owned());
        // Nothing runs, so nothing is saved.
        Ok(0)
    }

    async fn delete_template(
        &self,
        host_id: &str,
        template_id: &str,
    ) -> Result<(), PlacementError> {
        Self::check_host(host_id)?;
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(template_id);
        Ok(())
    }
}
