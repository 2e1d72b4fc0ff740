//! The pool's bookkeeping over a fake clone source.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_proto::agent::IdentityRequest;

use super::*;

/// A fake VM: its number, the hostname it was given, and whether it is "running".
#[derive(Debug)]
struct FakeClone {
    n: u32,
    hostname: Option<String>,
    alive: Arc<AtomicBool>,
    live_count: Arc<AtomicUsize>,
}

impl Drop for FakeClone {
    fn drop(&mut self) {
        self.live_count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hands out numbered clones; failures can be scheduled.
#[derive(Debug, Default)]
struct FakeSource {
    made: AtomicU32,
    /// Restores that fail before the next one succeeds.
    failing_restores: AtomicU32,
    /// Clone numbers that refuse their identity.
    refusing: Mutex<Vec<u32>>,
    /// Every clone's alive flag, by number.
    alive: Mutex<Vec<Arc<AtomicBool>>>,
    /// Clones not yet dropped.
    live: Arc<AtomicUsize>,
}

impl FakeSource {
    fn make(&self) -> Result<FakeClone, PoolError> {
        if self
            .failing_restores
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(PoolError::Restore("the VMM exited".into()));
        }
        let n = self.made.fetch_add(1, Ordering::SeqCst);
        let alive = Arc::new(AtomicBool::new(true));
        self.alive.lock().unwrap().push(alive.clone());
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(FakeClone {
            n,
            hostname: None,
            alive,
            live_count: self.live.clone(),
        })
    }
}

impl CloneSource for Arc<FakeSource> {
    type Clone = FakeClone;

    async fn restore_warm(&self) -> Result<FakeClone, PoolError> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.make()
    }

    async fn identify(
        &self,
        clone: &mut FakeClone,
        identity: &IdentityRequest,
    ) -> Result<(), PoolError> {
        if self.refusing.lock().unwrap().contains(&clone.n) {
            return Err(PoolError::Identity("entropy not applied".into()));
        }
        clone.hostname = Some(identity.hostname.clone());
        Ok(())
    }

    async fn restore_identified(&self, identity: &IdentityRequest) -> Result<FakeClone, PoolError> {
        let mut clone = self.make()?;
        clone.hostname = Some(identity.hostname.clone());
        Ok(clone)
    }

    fn is_alive(&self, clone: &FakeClone) -> bool {
        clone.alive.load(Ordering::SeqCst)
    }
}

fn config(target: usize, budget_mib: u64) -> PoolConfig {
    PoolConfig {
        template: "base".into(),
        target,
        memory_budget_mib: budget_mib,
        clone_memory_mib: 256,
    }
}

fn identity(name: &str) -> IdentityRequest {
    IdentityRequest::new(name, name).unwrap()
}

const FILL: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_take_from_a_full_pool_is_a_hit_and_the_pool_refills() {
    let source = Arc::new(FakeSource::default());
    let pool = ClonePool::start(source.clone(), config(3, 4096)).unwrap();
    assert!(pool.wait_full(FILL).await);
    assert_eq!(pool.stats().ready, 3);

    let taken = pool.take(&identity("sb-1")).await.unwrap();
    assert!(taken.from_pool);
    assert_eq!(taken.clone.hostname.as_deref(), Some("sb-1"));
    assert!(pool.wait_full(FILL).await, "refilled after the take");
    let stats = pool.stats();
    assert_eq!((stats.hits, stats.misses, stats.failures), (1, 0, 0));
    assert_eq!(source.made.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_empty_pool_restores_for_the_take() {
    let source = Arc::new(FakeSource::default());
    let pool = ClonePool::start(source.clone(), config(0, 4096)).unwrap();
    let taken = pool.take(&identity("sb-2")).await.unwrap();
    assert!(!taken.from_pool);
    assert_eq!(taken.clone.hostname.as_deref(), Some("sb-2"));
    let stats = pool.stats();
    assert_eq!((stats.hits, stats.misses, stats.ready), (0, 1, 0));
}

#[tokio::test]
async fn the_memory_budget_bounds_the_pool() {
    let source = Arc::new(FakeSource::default());
    let pool = ClonePool::start(source.clone(), config(5, 600)).unwrap();
    assert!(pool.wait_full(FILL).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = pool.stats();
    assert_eq!(stats.target, 2, "600 MiB hold two 256 MiB clones");
    assert_eq!(stats.ready, 2);
    assert_eq!(source.made.load(Ordering::SeqCst), 2);

    let error = ClonePool::start(source, config(1, 100)).unwrap_err();
    assert!(matches!(error, PoolError::Budget { .. }), "{error}");
}

#[tokio::test]
async fn dead_or_refusing_clones_are_skipped_and_replaced() {
    let source = Arc::new(FakeSource::default());
    let pool = ClonePool::start(source.clone(), config(3, 4096)).unwrap();
    assert!(pool.wait_full(FILL).await);
    // Clone 0 died while waiting, clone 1 refuses its identity: the take gets clone 2.
    source.alive.lock().unwrap()[0].store(false, Ordering::SeqCst);
    source.refusing.lock().unwrap().push(1);
    let taken = pool.take(&identity("sb-3")).await.unwrap();
    assert!(taken.from_pool);
    assert_eq!(taken.clone.n, 2);
    assert_eq!(pool.stats().failures, 2);
    assert!(pool.wait_full(FILL).await);
    drop(taken);
    assert_eq!(
        source.live.load(Ordering::SeqCst),
        3,
        "the dead and the refusing clone were dropped"
    );
}

#[tokio::test]
async fn a_clone_dying_in_the_pool_is_replaced_by_the_refill_task() {
    let source = Arc::new(FakeSource::default());
    let pool = ClonePool::start(source.clone(), config(2, 4096)).unwrap();
    assert!(pool.wait_full(FILL).await);
    source.alive.lock().unwrap()[1].store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + FILL;
    while source.made.load(Ordering::SeqCst) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "never replaced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pool.wait_full(FILL).await);
    assert_eq!(pool.stats().failures, 1);
    assert_eq!(source.live.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn failed_restores_are_counted_and_retried() {
    let source = Arc::new(FakeSource {
        failing_restores: AtomicU32::new(2),
        ..FakeSource::default()
    });
    let pool = ClonePool::start(source.clone(), config(1, 4096)).unwrap();
    assert!(pool.wait_full(FILL).await, "recovered after two failures");
    assert_eq!(pool.stats().failures, 2);
}

#[tokio::test]
async fn shutdown_frees_every_warm_clone_and_refuses_takes() {
    let source = Arc::new(FakeSource::default());
    let pool = ClonePool::start(source.clone(), config(3, 4096)).unwrap();
    assert!(pool.wait_full(FILL).await);
    let taken = pool.take(&identity("sb-4")).await.unwrap();
    pool.shutdown().await;
    assert_eq!(
        source.live.load(Ordering::SeqCst),
        1,
        "only the clone handed out lives on"
    );
    drop(taken);
    assert_eq!(source.live.load(Ordering::SeqCst), 0);

    let pool = ClonePool::start(source.clone(), config(1, 4096)).unwrap();
    pool.close();
    let error = pool.take(&identity("sb-5")).await.unwrap_err();
    assert!(matches!(error, PoolError::Closed { .. }), "{error}");
}

#[test]
fn stats_render_as_prometheus_text() {
    let stats = PoolStats {
        template: "code-interpreter".into(),
        target: 4,
        ready: 3,
        restoring: 1,
        hits: 10,
        misses: 2,
        failures: 0,
    };
    let text = PoolStats::render_prometheus(&[stats]);
    assert!(text.contains("# TYPE roost_pool_ready_clones gauge\n"));
    assert!(text.contains("roost_pool_ready_clones{template=\"code-interpreter\"} 3\n"));
    assert!(text.contains("roost_pool_hits_total{template=\"code-interpreter\"} 10\n"));
    assert!(text.contains("roost_pool_misses_total{template=\"code-interpreter\"} 2\n"));
    assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE")).count(), 6);
}
