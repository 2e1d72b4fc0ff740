//! Rate limiting for log lines a guest can provoke at will (a bad descriptor, a stray register
//! write): the first few are logged, then only one in every thousand, so a hostile guest cannot
//! flood the host's logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// How many occurrences are always logged before thinning starts.
const ALWAYS_LOGGED: u64 = 10;
/// After that, one occurrence in this many is logged.
const LOG_ONE_IN: u64 = 1000;

/// Counts occurrences of one log site.
#[derive(Debug)]
pub struct LogLimiter {
    seen: AtomicU64,
}

impl LogLimiter {
    /// A limiter that has seen nothing yet (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            seen: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; true when this one should be logged.
    pub fn allow(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        n < ALWAYS_LOGGED || n.is_multiple_of(LOG_ONE_IN)
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for guest-triggered conditions, limited per call site.
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static LIMITER: $crate::devices::virtio::ratelimit::LogLimiter =
            $crate::devices::virtio::ratelimit::LogLimiter::new();
        if LIMITER.allow() {
            tracing::warn!($($arg)*);
        }
    }};
}
pub(crate) use guest_warn;

/// `tracing::debug!` for per-packet or per-connection events a guest can trigger at will,
/// limited per call site like [`guest_warn!`].
macro_rules! guest_debug {
    ($($arg:tt)*) => {{
        static LIMITER: $crate::devices::virtio::ratelimit::LogLimiter =
            $crate::devices::virtio::ratelimit::LogLimiter::new();
        if tracing::enabled!(tracing::Level::DEBUG) && LIMITER.allow() {
            tracing::debug!($($arg)*);
        }
    }};
}
pub(crate) use guest_debug;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_few_then_thins_out() {
        let limiter = LogLimiter::new();
        let allowed = (0..5000).filter(|_| limiter.allow()).count();
        // 10 always, then occurrences 1000, 2000, 3000, 4000.
        assert_eq!(allowed, 14);
    }
}
