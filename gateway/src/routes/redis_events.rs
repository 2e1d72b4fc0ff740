//! Route events from Redis pub/sub: with several control instances each only streams its own
//! changes over SSE, but every instance PUBLISHes its changes as `{"sandbox_id","kind"}` on
//! `<prefix>routes` (`roost:routes` by default; control's `route_events` module). Subscribing
//! there gives a gateway every instance's changes.
//!
//! Pub/sub keeps nothing for absent subscribers, so every (re)subscription starts with a
//! synthetic `resync` that empties the route cache, exactly as control's SSE stream does.

use std::time::Duration;

use futures_util::StreamExt;

use super::{EventStream, RouteEvent, RouteEventKind};

/// The default channel (control's default key prefix `roost:` + `routes`).
pub const DEFAULT_CHANNEL: &str = "roost:routes";
/// Events buffered between the subscription's reader and the route sync.
const BUFFER: usize = 1024;
/// How long connecting and subscribing may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the subscription could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RedisEventsError {
    #[error("invalid Redis URL")]
    Url(#[source] redis::RedisError),
    #[error("cannot subscribe to {channel} on Redis")]
    Subscribe {
        channel: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis did not accept the subscription to {channel} within {SUBSCRIBE_TIMEOUT:?}")]
    Timeout { channel: String },
}

/// Subscribes to the route channel of one Redis.
#[derive(Debug, Clone)]
pub struct RedisRouteEvents {
    client: redis::Client,
    channel: String,
}

impl RedisRouteEvents {
    /// `url` like `redis://127.0.0.1:6379`; nothing connects until [`Self::events`].
    pub fn new(url: &str, channel: impl Into<String>) -> Result<Self, RedisEventsError> {
        Ok(Self {
            client: redis::Client::open(url).map_err(RedisEventsError::Url)?,
            channel: channel.into(),
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Subscribes and returns the events: a `resync` first, then one per published change.
    /// The stream ends when the connection does. Messages that are not route events are
    /// logged and skipped.
    pub async fn events(&self) -> Result<EventStream, RedisEventsError> {
        let subscribe = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe)
            .await
            .map_err(|_| RedisEventsError::Timeout {
                channel: self.channel.clone(),
            })?
            .map_err(|source| RedisEventsError::Subscribe {
                channel: self.channel.clone(),
                source,
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
        let resync = RouteEvent {
            sandbox_id: None,
            kind: RouteEventKind::Resync,
        };
        // The receiver is ours and empty: this cannot fail.
        let _ = tx.try_send(resync);
        let channel = self.channel.clone();
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let payload: Vec<u8> = message.get_payload_bytes().to_vec();
                match serde_json::from_slice::<RouteEvent>(&payload) {
                    Ok(event) => {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => tracing::warn!(
                        %channel,
                        %error,
                        payload = %String::from_utf8_lossy(&payload),
                        "not a route event; skipped"
                    ),
                }
            }
            tracing::warn!(%channel, "Redis subscription ended");
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local Redis the project's tests use (`.ci/dev` starts it).
    const REDIS_URL: &str = "redis://127.0.0.1:6379";

    #[tokio::test]
    async fn published_changes_arrive_after_a_resync_and_junk_is_skipped() {
        let channel = format!("roost-test-{}:routes", std::process::id());
        let events = RedisRouteEvents::new(REDIS_URL, channel.clone()).unwrap();
        let mut stream = events
            .events()
            .await
            .expect("a Redis on 127.0.0.1:6379 (.ci/dev starts one)");
        let first = stream.recv().await.unwrap();
        assert_eq!(
            (first.kind, first.sandbox_id),
            (RouteEventKind::Resync, None)
        );

        let client = redis::Client::open(REDIS_URL).unwrap();
        let mut publisher = client.get_multiplexed_async_connection().await.unwrap();
        for payload in [
            r#"{"sandbox_id":"cl-abc","kind":"changed"}"#,
            "not json",
            r#"{"sandbox_id":"cl-def","kind":"removed"}"#,
        ] {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(payload)
                .query_async(&mut publisher)
                .await
                .unwrap();
        }
        let changed = next_event(&mut stream).await;
        assert_eq!(
            (changed.kind, changed.sandbox_id.as_deref()),
            (RouteEventKind::Changed, Some("cl-abc"))
        );
        let removed = next_event(&mut stream).await;
        assert_eq!(
            (removed.kind, removed.sandbox_id.as_deref()),
            (RouteEventKind::Removed, Some("cl-def")),
            "the junk message in between was skipped"
        );
    }

    async fn next_event(stream: &mut EventStream) -> RouteEvent {
        tokio::time::timeout(Duration::from_secs(5), stream.recv())
            .await
            .expect("an event within 5 s")
            .expect("the stream is open")
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_a_typed_error_not_a_hang() {
        let events = RedisRouteEvents::new("redis://127.0.0.1:1", DEFAULT_CHANNEL).unwrap();
        let error = events.events().await.unwrap_err();
        assert!(
            matches!(
                error,
                RedisEventsError::Subscribe { .. } | RedisEventsError::Timeout { .. }
            ),
            "{error}"
        );
        assert!(matches!(
            RedisRouteEvents::new("not a url", DEFAULT_CHANNEL),
            Err(RedisEventsError::Url(_))
        ));
    }
}
