//! Publishing route changes on Redis, so that every gateway learns about every control
//! instance's changes: each change of the store's feed (`store::changes`) is PUBLISHed as
//! `{"sandbox_id","kind"}` on channel `<prefix>routes` (`roost:routes` by default).
//!
//! Pub/sub is fire-and-forget: a gateway that was not subscribed when a change went out never
//! sees it, so gateways flush their route cache whenever they (re)subscribe. For the same
//! reason a failed publish is logged and not retried: the change is already stale by the
//! time Redis is back, and the gateway's resubscribe flush covers it.

use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::broadcast::error::RecvError;

use crate::ratelimit::shared::{REDIS_TIMEOUT, SharedError, connect_manager};
use crate::store::Db;

/// Channel name after the key prefix.
pub const CHANNEL_SUFFIX: &str = "routes";

/// Publishes the change feed of `db` on Redis.
pub struct RoutePublisher {
    connection: ConnectionManager,
    channel: String,
}

impl std::fmt::Debug for RoutePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutePublisher")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl RoutePublisher {
    /// Connects to `url`; changes go to channel `<prefix>routes`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, SharedError> {
        Ok(Self {
            connection: connect_manager(url).await?,
            channel: format!("{prefix}{CHANNEL_SUFFIX}"),
        })
    }

    /// The channel changes are published on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Publishes every change made through `db` (and its clones) until the task is aborted.
    pub fn spawn(self, db: &Db) -> tokio::task::JoinHandle<()> {
        let mut changes = db.subscribe_changes();
        tokio::spawn(async move {
            let mut connection = self.connection;
            let mut failing_since: Option<tokio::time::Instant> = None;
            loop {
                let change = match changes.recv().await {
                    Ok(change) => change,
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "route publisher fell behind; changes dropped");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let Ok(payload) = serde_json::to_string(&change) else {
                    continue;
                };
                let sent: Result<Result<i64, redis::RedisError>, _> = tokio::time::timeout(
                    REDIS_TIMEOUT * 4,
                    connection.publish(&self.channel, payload),
                )
                .await;
                match sent {
                    Ok(Ok(_)) => failing_since = None,
                    failed => {
                        // Log the first failure of a streak and then at most every 30 s.
                        let now = tokio::time::Instant::now();
                        let quiet = failing_since
                            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(30));
                        if !quiet {
                            let error = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => "timed out".to_owned(),
                            };
                            tracing::warn!(%error, "cannot publish a route change on Redis");
                            failing_since = Some(now);
                        }
                    }
                }
            }
        })
    }
}
