//! Rate-limit windows shared by several control instances through Redis.
//!
//! The same GCRA as governor's, run atomically inside Redis by one Lua script per check: each
//! key holds its "theoretical arrival time" (microseconds, Redis's own clock, so instances with
//! skewed clocks agree) and expires when the budget is full again. Keys are
//! `<prefix>rl:<scope>:<id>`, so several installations (or test runs) can share one Redis.

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use super::{Budget, Exceeded};

/// GCRA: allow when the new arrival time minus `burst` intervals is not in the future.
/// KEYS[1]: the window; ARGV[1]: emission interval (µs); ARGV[2]: burst. Returns the wait in µs
/// (0 = allowed, and the request is counted).
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
";

/// Longest a check may wait for Redis before the caller falls back to local windows.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// Why a shared window could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("cannot reach Redis")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {REDIS_TIMEOUT:?}")]
    Timeout,
}

/// A Redis connection to `url` (`redis://host:port/db`) that reconnects by itself; the first
/// connection must succeed within a bounded time.
pub async fn connect_manager(url: &str) -> Result<ConnectionManager, SharedError> {
    let client = redis::Client::open(url)?;
    tokio::time::timeout(REDIS_TIMEOUT * 8, ConnectionManager::new(client))
        .await
        .map_err(|_| SharedError::Timeout)?
        .map_err(SharedError::from)
}

/// A handle to the shared windows (cheap to clone; reconnects by itself).
#[derive(Clone)]
pub struct SharedWindows {
    connection: ConnectionManager,
    prefix: String,
    script: Script,
}

impl std::fmt::Debug for SharedWindows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWindows")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl SharedWindows {
    /// Connects to `url` (`redis://host:port/db`); every key starts with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, SharedError> {
        Ok(Self {
            connection: connect_manager(url).await?,
            prefix: prefix.to_owned(),
            script: Script::new(GCRA),
        })
    }

    /// Spends one request of window `scope:id` under `budget`.
    pub async fn check(
        &self,
        scope: &str,
        id: &str,
        budget: Budget,
    ) -> Result<Result<(), Exceeded>, SharedError> {
        let interval_us = 1_000_000 / u64::from(budget.per_second.get()).max(1);
        let key = format!("{}rl:{scope}:{id}", self.prefix);
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(key);
        invocation.arg(interval_us.max(1)).arg(budget.burst.get());
        let wait_us: u64 =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| SharedError::Timeout)??;
        Ok(if wait_us == 0 {
            Ok(())
        } else {
            Err(Exceeded {
                retry_after: Duration::from_micros(wait_us),
            })
        })
    }
}
