//! Request budgets per credential (API key or user) and per team, with governor's GCRA.
//!
//! Both budgets are checked on every authenticated request; the first one exhausted answers
//! 429 with how long to wait. State is in process memory, unless [`shared::SharedWindows`]
//! (Redis) is configured: then every control instance spends from the same windows. If Redis
//! fails or is slow, the check falls back to the local windows (each instance then enforces its
//! own share) rather than failing requests or letting them through unchecked.

pub mod shared;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Budget {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// Budgets for one control instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_credential: Budget,
    pub per_team: Budget,
}

impl Default for Limits {
    fn default() -> Self {
        let n = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        Self {
            per_credential: Budget {
                per_second: n(20),
                burst: n(40),
            },
            per_team: Budget {
                per_second: n(50),
                burst: n(100),
            },
        }
    }
}

/// A request over budget, and how long until it would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded; retry in {retry_after:?}")]
pub struct Exceeded {
    pub retry_after: Duration,
}

#[derive(Debug)]
pub struct RateLimits {
    limits: Limits,
    credential: DefaultKeyedRateLimiter<String>,
    team: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    shared: Option<shared::SharedWindows>,
    /// Redis failures seen, to log only the first of every burst of them.
    shared_failures: AtomicU64,
}

impl RateLimits {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            credential: RateLimiter::keyed(limits.per_credential.quota()),
            team: RateLimiter::keyed(limits.per_team.quota()),
            clock: DefaultClock::default(),
            shared: None,
            shared_failures: AtomicU64::new(0),
        }
    }

    /// Spends from windows shared with other instances when `shared` is given.
    pub fn with_shared(mut self, shared: Option<shared::SharedWindows>) -> Self {
        self.shared = shared;
        self
    }

    /// Spends one request of `credential`'s and `team`'s budgets (the team's only if the
    /// credential's allows it, so a throttled key does not drain its team).
    pub async fn check(&self, credential: &str, team: Option<&str>) -> Result<(), Exceeded> {
        if let Some(shared) = &self.shared {
            let outcome = async {
                shared
                    .check("cred", credential, self.limits.per_credential)
                    .await??;
                if let Some(team) = team {
                    shared.check("team", team, self.limits.per_team).await??;
                }
                Ok::<_, SharedOutcome>(())
            }
            .await;
            match outcome {
                Ok(()) => return Ok(()),
                Err(SharedOutcome::Exceeded(e)) => return Err(e),
                Err(SharedOutcome::Unavailable(e)) => self.shared_failed(&e),
            }
        }
        self.check_local(credential, team)
    }

    /// Spends one request of `team`'s budget only (the credential was charged already).
    pub async fn check_team(&self, team: &str) -> Result<(), Exceeded> {
        if let Some(shared) = &self.shared {
            match shared.check("team", team, self.limits.per_team).await {
                Ok(result) => return result,
                Err(e) => self.shared_failed(&e),
            }
        }
        self.check_team_local(team)
    }

    fn shared_failed(&self, error: &shared::SharedError) {
        let n = self.shared_failures.fetch_add(1, Ordering::Relaxed);
        // Log the 1st, 2nd, 4th, 8th... failure: visible, but no flood while Redis is down.
        if n.is_power_of_two() || n == 0 {
            tracing::warn!(error = %error, failures = n + 1, "shared rate limits unavailable; using local windows");
        }
    }

    fn check_local(&self, credential: &str, team: Option<&str>) -> Result<(), Exceeded> {
        let now = self.clock.now();
        self.credential
            .check_key(&credential.to_owned())
            .map_err(|n| Exceeded {
                retry_after: n.wait_time_from(now),
            })?;
        if let Some(team) = team {
            self.team
                .check_key(&team.to_owned())
                .map_err(|n| Exceeded {
                    retry_after: n.wait_time_from(now),
                })?;
        }
        Ok(())
    }

    fn check_team_local(&self, team: &str) -> Result<(), Exceeded> {
        let now = self.clock.now();
        self.team.check_key(&team.to_owned()).map_err(|n| Exceeded {
            retry_after: n.wait_time_from(now),
        })
    }

    /// Drops the state of keys that are back to a full budget (call periodically).
    pub fn shrink(&self) {
        self.credential.retain_recent();
        self.team.retain_recent();
    }
}

/// A shared check that did not pass, either way.
enum SharedOutcome {
    Exceeded(Exceeded),
    Unavailable(shared::SharedError),
}

impl From<Exceeded> for SharedOutcome {
    fn from(e: Exceeded) -> Self {
        Self::Exceeded(e)
    }
}

impl From<shared::SharedError> for SharedOutcome {
    fn from(e: shared::SharedError) -> Self {
        Self::Unavailable(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tight() -> Limits {
        let one = NonZeroU32::MIN;
        Limits {
            per_credential: Budget {
                per_second: one,
                burst: NonZeroU32::new(2).unwrap(),
            },
            per_team: Budget {
                per_second: one,
                burst: NonZeroU32::new(3).unwrap(),
            },
        }
    }

    #[tokio::test]
    async fn credential_budget_runs_out_and_reports_a_wait() {
        let limits = RateLimits::new(tight());
        assert!(limits.check("k1", None).await.is_ok());
        assert!(limits.check("k1", None).await.is_ok());
        let err = limits.check("k1", None).await.unwrap_err();
        assert!(err.retry_after > Duration::ZERO && err.retry_after <= Duration::from_secs(1));
        // Another credential has its own budget.
        assert!(limits.check("k2", None).await.is_ok());
    }

    #[tokio::test]
    async fn team_budget_is_shared_by_its_credentials() {
        let limits = RateLimits::new(tight());
        assert!(limits.check("a", Some("t")).await.is_ok());
        assert!(limits.check("b", Some("t")).await.is_ok());
        assert!(limits.check("c", Some("t")).await.is_ok());
        assert!(limits.check("d", Some("t")).await.is_err());
        assert!(limits.check("e", Some("other")).await.is_ok());
        assert!(limits.check_team("other").await.is_ok());
    }
}
