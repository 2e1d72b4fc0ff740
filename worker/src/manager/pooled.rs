//! [`PooledBackend`]: the real backend with pre-warmed pools ([`crate::pool`]) in front of the
//! built-in templates, so that a create of such a template takes a warm clone and only hands
//! it its identity. Snapshots a worker took (user templates, paused sandboxes) restore as
//! before.
//!
//! Pools start after the manager has cleared its runtime root ([`PooledBackend::start_pools`]);
//! their clones live in `<runtime_root>/pool-…` directories, so a crashed worker's warm clones
//! are removed with the rest at the next start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use roost_net::EgressPolicy;
use roost_proto::agent::IdentityRequest;

use super::backend::{HandleBackend, VmBackend, VmFailure};
use crate::pool::{ClonePool, HandleSource, PoolConfig, PoolError, PoolStats};
use crate::template::{META_FILE, TemplateMeta};
use crate::vm_handle::VmHandle;

/// How many warm clones to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPlan {
    /// Warm clones per built-in template.
    pub per_template: usize,
    /// Guest memory all warm clones of all templates may hold, split evenly.
    pub memory_budget_mib: u64,
    /// Where the clones' runtime directories go (the manager's runtime root).
    pub runtime_root: PathBuf,
}

type Pools = BTreeMap<PathBuf, Arc<ClonePool<HandleSource>>>;

/// [`HandleBackend`] with pools (see the module docs). Clones share the pools.
#[derive(Debug, Clone, Default)]
pub struct PooledBackend {
    pub inner: HandleBackend,
    pools: Arc<Mutex<Pools>>,
}

impl PooledBackend {
    pub fn new(inner: HandleBackend) -> Self {
        Self {
            inner,
            pools: Arc::default(),
        }
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts one pool per template (`id` → snapshot directory), each holding up to
    /// `plan.per_template` clones within its share of the budget. Call inside the tokio runtime,
    /// after the runtime root was cleared.
    pub fn start_pools(
        &self,
        templates: &BTreeMap<String, PathBuf>,
        plan: &PoolPlan,
    ) -> Result<(), PoolError> {
        if plan.per_template == 0 || templates.is_empty() {
            return Ok(());
        }
        let share = plan.memory_budget_mib / u64::try_from(templates.len()).unwrap_or(u64::MAX);
        let mut pools = self.pools();
        for (id, snapshot_dir) in templates {
            let restore = self
                .inner
                .restore_config(snapshot_dir, &plan.runtime_root.join("unused"));
            let source = HandleSource::new(restore, &plan.runtime_root, id.clone())
                .with_network(self.inner.net.clone());
            let config = PoolConfig {
                template: id.clone(),
                target: plan.per_template,
                memory_budget_mib: share,
                clone_memory_mib: template_memory_mib(snapshot_dir),
            };
            tracing::info!(template = %id, target = config.effective_target(), "starting a warm pool");
            pools.insert(
                snapshot_dir.clone(),
                Arc::new(ClonePool::start(source, config)?),
            );
        }
        Ok(())
    }

    /// Every pool's state.
    pub fn pool_stats(&self) -> Vec<PoolStats> {
        self.pools().values().map(|pool| pool.stats()).collect()
    }

    /// Stops every pool and frees its warm clones.
    pub async fn shutdown_pools(&self) {
        let pools = std::mem::take(&mut *self.pools());
        for pool in pools.into_values() {
            // A take in flight holds the pool; it closes (and frees its clones) when dropped.
            if let Ok(pool) = Arc::try_unwrap(pool) {
                pool.shutdown().await;
            }
        }
    }
}

/// The guest memory of the template whose snapshot is `snapshot_dir` (its `template.json`
/// beside it), 256 MiB when it cannot be read.
fn template_memory_mib(snapshot_dir: &Path) -> u64 {
    const FALLBACK_MIB: u64 = 256;
    let Some(meta_path) = snapshot_dir.parent().map(|dir| dir.join(META_FILE)) else {
        return FALLBACK_MIB;
    };
    std::fs::read(&meta_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<TemplateMeta>(&bytes).ok())
        .map_or(FALLBACK_MIB, |meta| meta.mem_mib)
}

impl VmBackend for PooledBackend {
    type Vm = VmHandle;

    async fn restore(
        &self,
        snapshot_dir: &Path,
        runtime_dir: &Path,
        identity: &IdentityRequest,
        egress: &EgressPolicy,
    ) -> Result<VmHandle, VmFailure> {
        let pool = self.pools().get(snapshot_dir).cloned();
        let Some(pool) = pool else {
            return self
                .inner
                .restore(snapshot_dir, runtime_dir, identity, egress)
                .await;
        };
        let mut taken = pool.take(identity).await?;
        tracing::debug!(from_pool = taken.from_pool, "sandbox VM from the pool");
        // Pool clones wait in networking that refuses everything until now; a failure drops
        // (kills) the clone and its network.
        self.inner
            .activate_network(&mut taken.clone, egress)
            .await?;
        Ok(taken.clone)
    }
}
