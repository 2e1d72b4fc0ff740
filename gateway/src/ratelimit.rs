//! Request rate limits per client IP and per API key (GCRA through `governor`).
//!
//! API keys are limited by their SHA-256, so the limiter's table holds no secrets. A periodic
//! [`RateLimits::housekeeping`] drops idle entries so the tables stay bounded.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use http::HeaderMap;
use sha2::{Digest, Sha256};

/// A sustained rate and a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Limit {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// Which limit refused a request, and how long until it would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    ClientIp(Duration),
    ApiKey(Duration),
}

impl Limited {
    pub fn scope(&self) -> &'static str {
        match self {
            Limited::ClientIp(_) => "ip",
            Limited::ApiKey(_) => "api_key",
        }
    }

    pub fn wait(&self) -> Duration {
        match self {
            Limited::ClientIp(wait) | Limited::ApiKey(wait) => *wait,
        }
    }
}

#[derive(Debug)]
pub struct RateLimits {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_key: Option<DefaultKeyedRateLimiter<[u8; 32]>>,
    clock: DefaultClock,
}

impl RateLimits {
    /// `None` disables that limit.
    pub fn new(per_ip: Option<Limit>, per_key: Option<Limit>) -> Self {
        Self {
            per_ip: per_ip.map(|l| DefaultKeyedRateLimiter::keyed(l.quota())),
            per_key: per_key.map(|l| DefaultKeyedRateLimiter::keyed(l.quota())),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one request from `ip` carrying `api_key` (either may be absent).
    pub fn check(&self, ip: Option<IpAddr>, api_key: Option<&[u8]>) -> Result<(), Limited> {
        if let (Some(limiter), Some(ip)) = (&self.per_ip, ip) {
            limiter.check_key(&ip).map_err(|not_until| {
                Limited::ClientIp(not_until.wait_time_from(self.clock.now()))
            })?;
        }
        if let (Some(limiter), Some(key)) = (&self.per_key, api_key) {
            let digest: [u8; 32] = Sha256::digest(key).into();
            limiter
                .check_key(&digest)
                .map_err(|not_until| Limited::ApiKey(not_until.wait_time_from(self.clock.now())))?;
        }
        Ok(())
    }

    /// Drops entries of keys that are back to a full burst.
    pub fn housekeeping(&self) {
        if let Some(limiter) = &self.per_ip {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.per_key {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The API key of a request: E2B's `X-API-KEY`, or a bearer token (control's native API).
pub fn api_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(key) = headers.get("x-api-key") {
        return Some(key.as_bytes());
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let token = auth
        .strip_prefix(b"Bearer ")
        .or_else(|| auth.strip_prefix(b"bearer "))?;
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32, burst: u32) -> Limit {
        Limit {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn per_ip_burst_then_refused() {
        let limits = RateLimits::new(Some(limit(1, 3)), None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            limits.check(Some(a), None).unwrap();
        }
        let refused = limits.check(Some(a), None).unwrap_err();
        assert_eq!(refused.scope(), "ip");
        assert!(refused.wait() > Duration::ZERO && refused.wait() <= Duration::from_secs(1));
        // Another client is unaffected.
        limits.check(Some(b), None).unwrap();
    }

    #[test]
    fn per_key_limit_is_separate_from_ip() {
        let limits = RateLimits::new(Some(limit(100, 100)), Some(limit(1, 1)));
        let ip: IpAddr = "::1".parse().unwrap();
        limits.check(Some(ip), Some(b"e2b_aa")).unwrap();
        assert!(matches!(
            limits.check(Some(ip), Some(b"e2b_aa")),
            Err(Limited::ApiKey(_))
        ));
        limits.check(Some(ip), Some(b"e2b_bb")).unwrap();
        limits.check(Some(ip), None).unwrap();
        limits.housekeeping();
    }

    #[test]
    fn api_key_sources() {
        let mut h = HeaderMap::new();
        assert_eq!(api_key(&h), None);
        h.insert("authorization", "Bearer jwt".parse().unwrap());
        assert_eq!(api_key(&h), Some(&b"jwt"[..]));
        h.insert("x-api-key", "e2b_1".parse().unwrap());
        assert_eq!(api_key(&h), Some(&b"e2b_1"[..]));
        let mut basic = HeaderMap::new();
        basic.insert("authorization", "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(api_key(&basic), None);
    }
}
