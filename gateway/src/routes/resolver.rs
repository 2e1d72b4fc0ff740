//! The proxy's one question: "where do I send this sandbox's traffic, now?"
//!
//! Answers from the cache when it can, asks control when it must, and resumes a paused sandbox
//! (auto-resume) before answering, waiting a bounded time. Concurrent requests for the same
//! paused sandbox share one resume call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_proto::ids::SandboxId;

use super::cache::RouteCache;
use super::{ControlApi, ControlError, ResumeOutcome, Route, RouteState};
use crate::metrics::Metrics;

/// How often a sandbox being created is looked up again.
const CREATING_POLL: Duration = Duration::from_millis(100);

/// Why there is no route to use.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Unknown, dead, or in a state that takes no traffic (the contract's 502).
    #[error("sandbox not found or not running")]
    NotFound,
    /// Paused, and control could not resume it (409/503 from control).
    #[error("control refused to resume the sandbox ({0})")]
    ResumeRefused(u16),
    /// Paused, and auto-resume is off.
    #[error("sandbox is paused")]
    Paused,
    #[error("route look-up failed")]
    Control(#[from] ControlError),
}

#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// Resume paused sandboxes on first request.
    pub auto_resume: bool,
    /// Longest wait for a resume.
    pub resume_timeout: Duration,
}

pub struct Resolver {
    control: Arc<dyn ControlApi>,
    cache: Arc<RouteCache>,
    config: ResolverConfig,
    metrics: Arc<Metrics>,
    resuming: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    pub fn new(
        control: Arc<dyn ControlApi>,
        cache: Arc<RouteCache>,
        config: ResolverConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            control,
            cache,
            config,
            metrics,
            resuming: Mutex::new(HashMap::new()),
        }
    }

    /// A route in state `Running` with a worker, resuming the sandbox first if needed.
    pub async fn resolve(&self, sandbox: &SandboxId) -> Result<Arc<Route>, ResolveError> {
        let route = self.lookup(sandbox).await?;
        match route.state {
            RouteState::Running => routable(route),
            RouteState::Paused if self.config.auto_resume => self.resume(sandbox).await,
            RouteState::Paused => Err(ResolveError::Paused),
            RouteState::Creating => self.wait_created(sandbox).await,
            RouteState::Other => Err(ResolveError::NotFound),
        }
    }

    /// A sandbox being created runs shortly: ask again until it does (bounded by the resume
    /// timeout).
    async fn wait_created(&self, sandbox: &SandboxId) -> Result<Arc<Route>, ResolveError> {
        let deadline = tokio::time::Instant::now() + self.config.resume_timeout;
        loop {
            tokio::time::sleep(CREATING_POLL).await;
            self.cache.invalidate(sandbox);
            let route = self.lookup(sandbox).await?;
            match route.state {
                RouteState::Running => return routable(route),
                RouteState::Creating if tokio::time::Instant::now() < deadline => continue,
                _ => return Err(ResolveError::NotFound),
            }
        }
    }

    async fn lookup(&self, sandbox: &SandboxId) -> Result<Arc<Route>, ResolveError> {
        if let Some(route) = self.cache.get(sandbox) {
            self.metrics.route_lookups.with_label_values(&["hit"]).inc();
            return Ok(route);
        }
        self.metrics
            .route_lookups
            .with_label_values(&["miss"])
            .inc();
        let epoch = self.cache.epoch();
        let route = Arc::new(
            self.control
                .route(sandbox)
                .await?
                .ok_or(ResolveError::NotFound)?,
        );
        if route.sandbox_id != sandbox.as_str() {
            // Control answered for another sandbox: never route on that.
            return Err(ResolveError::NotFound);
        }
        self.cache.insert(sandbox.clone(), route.clone(), epoch);
        Ok(route)
    }

    async fn resume(&self, sandbox: &SandboxId) -> Result<Arc<Route>, ResolveError> {
        let gate = {
            let mut resuming = self.resuming.lock().unwrap_or_else(|e| e.into_inner());
            resuming.entry(sandbox.clone()).or_default().clone()
        };
        let result = {
            let _turn = gate.lock().await;
            // Someone ahead of us may have resumed it already.
            self.cache.invalidate(sandbox);
            let route = self.lookup(sandbox).await?;
            if route.state == RouteState::Running {
                routable(route)
            } else {
                self.resume_now(sandbox).await
            }
        };
        let mut resuming = self.resuming.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&gate) <= 2 {
            resuming.remove(sandbox);
        }
        result
    }

    async fn resume_now(&self, sandbox: &SandboxId) -> Result<Arc<Route>, ResolveError> {
        tracing::info!(sandbox = %sandbox, "auto-resuming a paused sandbox");
        let outcome = self
            .control
            .resume(sandbox, self.config.resume_timeout)
            .await;
        let label = match &outcome {
            Ok(ResumeOutcome::Resumed) => "resumed",
            Ok(ResumeOutcome::NotFound) => "not_found",
            Ok(ResumeOutcome::Refused(_)) => "refused",
            Err(_) => "error",
        };
        self.metrics.resumes.with_label_values(&[label]).inc();
        match outcome? {
            ResumeOutcome::Resumed => {}
            ResumeOutcome::NotFound => return Err(ResolveError::NotFound),
            ResumeOutcome::Refused(status) => return Err(ResolveError::ResumeRefused(status)),
        }
        self.cache.invalidate(sandbox);
        let route = self.lookup(sandbox).await?;
        match route.state {
            RouteState::Running => routable(route),
            _ => Err(ResolveError::NotFound),
        }
    }
}

fn routable(route: Arc<Route>) -> Result<Arc<Route>, ResolveError> {
    if route.worker_id.is_some() {
        Ok(route)
    } else {
        Err(ResolveError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::EventStream;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Control with one sandbox that starts paused; resume flips it to running.
    struct FakeControl {
        state: Mutex<RouteState>,
        fetches: AtomicUsize,
        resumes: AtomicUsize,
        resume_reply: ResumeOutcome,
    }

    impl FakeControl {
        fn new(state: RouteState, resume_reply: ResumeOutcome) -> Arc<Self> {
            Arc::new(Self {
                state: Mutex::new(state),
                fetches: AtomicUsize::new(0),
                resumes: AtomicUsize::new(0),
                resume_reply,
            })
        }
    }

    #[async_trait]
    impl ControlApi for FakeControl {
        async fn route(&self, sandbox: &SandboxId) -> Result<Option<Route>, ControlError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if sandbox.as_str() != "cl-a" {
                return Ok(None);
            }
            Ok(Some(Route {
                sandbox_id: "cl-a".into(),
                team_id: "t".into(),
                state: *self.state.lock().unwrap(),
                worker_id: Some("w1".into()),
                envd_access_token_sha256: None,
                public: true,
                traffic_access_token_sha256: None,
            }))
        }
        async fn resume(&self, _: &SandboxId, _: Duration) -> Result<ResumeOutcome, ControlError> {
            self.resumes.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.resume_reply == ResumeOutcome::Resumed {
                *self.state.lock().unwrap() = RouteState::Running;
            }
            Ok(self.resume_reply)
        }
        async fn events(&self) -> Result<EventStream, ControlError> {
            Ok(tokio::sync::mpsc::channel(1).1)
        }
    }

    fn resolver(control: Arc<FakeControl>, auto_resume: bool) -> Resolver {
        let cache = Arc::new(RouteCache::new(Duration::from_secs(60)));
        cache.set_trusted(true);
        Resolver::new(
            control,
            cache,
            ResolverConfig {
                auto_resume,
                resume_timeout: Duration::from_secs(5),
            },
            Arc::new(Metrics::new()),
        )
    }

    fn id(s: &str) -> SandboxId {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn running_routes_are_cached() {
        let control = FakeControl::new(RouteState::Running, ResumeOutcome::Resumed);
        let r = resolver(control.clone(), true);
        assert_eq!(
            r.resolve(&id("cl-a")).await.unwrap().worker_id.as_deref(),
            Some("w1")
        );
        r.resolve(&id("cl-a")).await.unwrap();
        assert_eq!(control.fetches.load(Ordering::SeqCst), 1);
        assert!(matches!(
            r.resolve(&id("cl-b")).await,
            Err(ResolveError::NotFound)
        ));
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_resume() {
        let control = FakeControl::new(RouteState::Paused, ResumeOutcome::Resumed);
        let r = Arc::new(resolver(control.clone(), true));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                r.resolve(&id("cl-a")).await.map(|route| route.state)
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), RouteState::Running);
        }
        assert_eq!(control.resumes.load(Ordering::SeqCst), 1);
        assert!(r.resuming.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_sandbox_being_created_is_waited_for() {
        let control = FakeControl::new(RouteState::Creating, ResumeOutcome::Resumed);
        let r = Arc::new(resolver(control.clone(), true));
        let flip = {
            let control = control.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(250)).await;
                *control.state.lock().unwrap() = RouteState::Running;
            })
        };
        assert_eq!(
            r.resolve(&id("cl-a")).await.unwrap().state,
            RouteState::Running
        );
        flip.await.unwrap();
        assert!(control.fetches.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test]
    async fn resume_refused_or_disabled() {
        let control = FakeControl::new(RouteState::Paused, ResumeOutcome::Refused(503));
        let r = resolver(control, true);
        assert!(matches!(
            r.resolve(&id("cl-a")).await,
            Err(ResolveError::ResumeRefused(503))
        ));
        let control = FakeControl::new(RouteState::Paused, ResumeOutcome::Resumed);
        let r = resolver(control.clone(), false);
        assert!(matches!(
            r.resolve(&id("cl-a")).await,
            Err(ResolveError::Paused)
        ));
        assert_eq!(control.resumes.load(Ordering::SeqCst), 0);
    }
}
