//! Pre-warmed pools: per template, up to N clones already restored and waiting, so a create
//! costs only the hand-over of an identity instead of a restore.
//!
//! A warm clone is a VM restored from the template's snapshot whose agent answers, but which
//! still carries the template's identity: it must not run anything until
//! [`ClonePool::take`] hands it the sandbox's identity (fresh entropy, hostname, clock, token).
//! A background task keeps the pool at its target, bounded by a memory budget (guest memory
//! committed to warm clones), restoring one clone at a time so refills never starve the
//! creates in flight; clones whose VMM died while waiting are dropped and replaced. A take
//! from an empty pool (a miss) restores directly — the pool only ever makes creates faster.
//!
//! The pool is generic over [`CloneSource`] so its bookkeeping is tested without VMs;
//! [`HandleSource`] is the real one over [`VmHandle`].

mod source;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use roost_proto::agent::IdentityRequest;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub use source::{CloneSource, HandleSource};

/// How often the refill task looks at the pool even when nobody woke it (dead clones).
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// The longest wait between failed restores.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The first wait after a failed restore.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Why a clone could not be made or handed over.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the pool's memory budget ({budget_mib} MiB) is below one clone ({clone_mib} MiB)")]
    Budget { budget_mib: u64, clone_mib: u64 },
    #[error("the pool for {template} is shut down")]
    Closed { template: String },
    #[error("restoring a clone failed")]
    Restore(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the clone did not take its identity")]
    Identity(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The size of one template's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The template's name (metrics label, runtime directory names).
    pub template: String,
    /// Warm clones to keep.
    pub target: usize,
    /// Guest memory all warm clones may hold together.
    pub memory_budget_mib: u64,
    /// Guest memory of one clone (the template's).
    pub clone_memory_mib: u64,
}

impl PoolConfig {
    /// Clones the pool keeps: the target, as far as the budget allows.
    pub fn effective_target(&self) -> usize {
        let by_budget = self
            .memory_budget_mib
            .checked_div(self.clone_memory_mib)
            .unwrap_or(0);
        self.target
            .min(usize::try_from(by_budget).unwrap_or(usize::MAX))
    }
}

/// A point-in-time view of a pool, for metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    pub template: String,
    /// Clones the pool aims to hold (target bounded by the memory budget).
    pub target: usize,
    /// Warm clones waiting now.
    pub ready: usize,
    /// Restores under way for the pool.
    pub restoring: usize,
    /// Takes served by a warm clone.
    pub hits: u64,
    /// Takes that had to restore (the pool was empty).
    pub misses: u64,
    /// Restores or hand-overs that failed (their clones were dropped).
    pub failures: u64,
}

impl PoolStats {
    /// The stats of several pools in the Prometheus text format.
    pub fn render_prometheus(pools: &[PoolStats]) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&PoolStats) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for pool in pools {
                let _ = writeln!(
                    out,
                    "{name}{{template=\"{}\"}} {}",
                    pool.template.replace(['\\', '"', '\n'], "_"),
                    value(pool)
                );
            }
        };
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        family(
            "roost_pool_target_clones",
            "gauge",
            "Warm clones the pool aims to hold (bounded by its memory budget).",
            &|p| count(p.target),
        );
        family(
            "roost_pool_ready_clones",
            "gauge",
            "Warm clones waiting to be handed out.",
            &|p| count(p.ready),
        );
        family(
            "roost_pool_restoring_clones",
            "gauge",
            "Restores under way to refill the pool.",
            &|p| count(p.restoring),
        );
        family(
            "roost_pool_hits_total",
            "counter",
            "Creates served by a warm clone.",
            &|p| p.hits,
        );
        family(
            "roost_pool_misses_total",
            "counter",
            "Creates that found the pool empty and restored directly.",
            &|p| p.misses,
        );
        family(
            "roost_pool_failures_total",
            "counter",
            "Clone restores or identity hand-overs that failed.",
            &|p| p.failures,
        );
        out
    }
}

/// What [`ClonePool::take`] returns.
#[derive(Debug)]
pub struct Taken<C> {
    pub clone: C,
    /// True when a warm clone was handed over, false when it was restored for this take.
    pub from_pool: bool,
}

struct Shared<S: CloneSource> {
    source: S,
    config: PoolConfig,
    ready: Mutex<VecDeque<S::Clone>>,
    restoring: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
    failures: AtomicU64,
    wake: Notify,
    closed: AtomicBool,
}

impl<S: CloneSource> Shared<S> {
    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<S::Clone>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pop_ready(&self) -> Option<S::Clone> {
        self.ready().pop_front()
    }
}

/// One template's pool of warm clones (see the module docs).
pub struct ClonePool<S: CloneSource> {
    shared: Arc<Shared<S>>,
    refill: Option<JoinHandle<()>>,
}

impl<S: CloneSource> std::fmt::Debug for ClonePool<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClonePool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl<S: CloneSource> ClonePool<S> {
    /// Starts the pool's refill task (on the current tokio runtime).
    pub fn start(source: S, config: PoolConfig) -> Result<Self, PoolError> {
        if config.target > 0 && config.effective_target() == 0 {
            return Err(PoolError::Budget {
                budget_mib: config.memory_budget_mib,
                clone_mib: config.clone_memory_mib,
            });
        }
        let shared = Arc::new(Shared {
            source,
            config,
            ready: Mutex::new(VecDeque::new()),
            restoring: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let refill = tokio::spawn(refill(shared.clone()));
        Ok(Self {
            shared,
            refill: Some(refill),
        })
    }

    /// A clone with `identity`: a warm one if the pool has one (a hit), else restored now (a
    /// miss). A warm clone that fails to take its identity is dropped and the next is tried.
    pub async fn take(&self, identity: &IdentityRequest) -> Result<Taken<S::Clone>, PoolError> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(PoolError::Closed {
                template: shared.config.template.clone(),
            });
        }
        while let Some(mut clone) = shared.pop_ready() {
            shared.wake.notify_one();
            if !shared.source.is_alive(&clone) {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match shared.source.identify(&mut clone, identity).await {
                Ok(()) => {
                    shared.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Taken {
                        clone,
                        from_pool: true,
                    });
                }
                Err(e) => {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(template = %shared.config.template, error = %e, "a warm clone refused its identity; dropped");
                }
            }
        }
        shared.misses.fetch_add(1, Ordering::Relaxed);
        shared.wake.notify_one();
        let clone = shared.source.restore_identified(identity).await?;
        Ok(Taken {
            clone,
            from_pool: false,
        })
    }

    pub fn stats(&self) -> PoolStats {
        let shared = &self.shared;
        PoolStats {
            template: shared.config.template.clone(),
            target: shared.config.effective_target(),
            ready: shared.ready().len(),
            restoring: shared.restoring.load(Ordering::Relaxed),
            hits: shared.hits.load(Ordering::Relaxed),
            misses: shared.misses.load(Ordering::Relaxed),
            failures: shared.failures.load(Ordering::Relaxed),
        }
    }

    /// Waits until the pool holds its target (or `timeout` passes); true when it does.
    pub async fn wait_full(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.shared.ready().len() >= self.shared.config.effective_target() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops refilling and drops every warm clone (their VMs are killed and freed).
    pub async fn shutdown(mut self) {
        self.close();
        if let Some(refill) = self.refill.take() {
            let _ = refill.await;
        }
        let clones: Vec<_> = self.shared.ready().drain(..).collect();
        drop(clones);
    }

    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl<S: CloneSource> Drop for ClonePool<S> {
    fn drop(&mut self) {
        self.close();
        if let Some(refill) = self.refill.take() {
            refill.abort();
        }
        self.shared.ready().clear();
    }
}

/// Keeps the pool at its target: one restore at a time, dead clones dropped, failures backed
/// off exponentially.
async fn refill<S: CloneSource>(shared: Arc<Shared<S>>) {
    let target = shared.config.effective_target();
    let mut backoff = FIRST_BACKOFF;
    while !shared.closed.load(Ordering::Acquire) {
        let dead = {
            let mut ready = shared.ready();
            let before = ready.len();
            ready.retain(|clone| shared.source.is_alive(clone));
            before - ready.len()
        };
        if dead > 0 {
            shared
                .failures
                .fetch_add(u64::try_from(dead).unwrap_or(u64::MAX), Ordering::Relaxed);
            tracing::warn!(template = %shared.config.template, dead, "warm clones died while waiting");
        }
        if shared.ready().len() >= target {
            let _ = tokio::time::timeout(RECHECK_EVERY, shared.wake.notified()).await;
            continue;
        }
        shared.restoring.fetch_add(1, Ordering::Relaxed);
        let restored = shared.source.restore_warm().await;
        shared.restoring.fetch_sub(1, Ordering::Relaxed);
        match restored {
            Ok(clone) if !shared.closed.load(Ordering::Acquire) => {
                shared.ready().push_back(clone);
                backoff = FIRST_BACKOFF;
            }
            Ok(_) => {}
            Err(e) => {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(template = %shared.config.template, error = %e, ?backoff, "restoring a warm clone failed");
                let _ = tokio::time::timeout(backoff, async {
                    while !shared.closed.load(Ordering::Acquire) {
                        shared.wake.notified().await;
                    }
                })
                .await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
