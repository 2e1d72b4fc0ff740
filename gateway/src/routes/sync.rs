//! Background service that keeps the route cache honest: it follows the route event stream —
//! control's SSE stream, or Redis pub/sub when several control instances run — and drops the
//! entry of every sandbox that changed. While the stream is down the cache is not trusted
//! (every look-up asks control); it reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use roost_proto::ids::SandboxId;

use super::cache::RouteCache;
use super::redis_events::RedisRouteEvents;
use super::{ControlApi, RouteEventKind};
use crate::metrics::Metrics;
use crate::report::error_chain;

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub struct RouteSync {
    control: Arc<dyn ControlApi>,
    /// Follow this Redis channel instead of control's own stream.
    redis: Option<RedisRouteEvents>,
    cache: Arc<RouteCache>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RouteSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSync").finish_non_exhaustive()
    }
}

impl RouteSync {
    pub fn new(
        control: Arc<dyn ControlApi>,
        cache: Arc<RouteCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            control,
            redis: None,
            cache,
            metrics,
        }
    }

    /// Follows `events` (every control instance's changes) instead of control's stream.
    pub fn with_redis(mut self, events: RedisRouteEvents) -> Self {
        self.redis = Some(events);
        self
    }

    /// Follows the stream until it ends; returns whether it ever connected.
    async fn follow_once(&self) -> bool {
        let opened = match &self.redis {
            Some(redis) => redis.events().await.map_err(|e| error_chain(&e)),
            None => self.control.events().await.map_err(|e| error_chain(&e)),
        };
        let mut events = match opened {
            Ok(events) => events,
            Err(error) => {
                tracing::warn!(%error, "route event stream unavailable; looking routes up uncached");
                return false;
            }
        };
        // Events may have been missed while disconnected: start from an empty cache.
        self.cache.clear();
        self.cache.set_trusted(true);
        self.metrics.route_stream_up.set(1);
        tracing::info!("following control's route events");
        while let Some(event) = events.recv().await {
            match (event.kind, event.sandbox_id.as_deref()) {
                (RouteEventKind::Resync, _) => self.cache.clear(),
                (_, Some(id)) => match id.parse::<SandboxId>() {
                    Ok(id) => self.cache.invalidate(&id),
                    // Not a sandbox id we could have cached: nothing to drop.
                    Err(_) => continue,
                },
                // A change without a sandbox: the safe reading is "anything may have changed".
                (_, None) => self.cache.clear(),
            }
            self.metrics.route_events.inc();
        }
        self.cache.set_trusted(false);
        self.metrics.route_stream_up.set(0);
        tracing::warn!("route event stream ended; reconnecting");
        true
    }
}

#[async_trait]
impl BackgroundService for RouteSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = MIN_BACKOFF;
        loop {
            tokio::select! {
                connected = self.follow_once() => {
                    backoff = if connected { MIN_BACKOFF } else { (backoff * 2).min(MAX_BACKOFF) };
                }
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
