//! Request budgets per credential (API key or user) and per team, with governor's GCRA.
//!
//! Both budgets are checked on every authenticated request; the first one exhausted answers
//! 429 with how long to wait. State is in process memory: with several control instances each
//! enforces its own share (shared windows through Redis are a later step).

use std::num::NonZeroU32;
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
    credential: DefaultKeyedRateLimiter<String>,
    team: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl RateLimits {
    pub fn new(limits: Limits) -> Self {
        Self {
            credential: RateLimiter::keyed(limits.per_credential.quota()),
            team: RateLimiter::keyed(limits.per_team.quota()),
            clock: DefaultClock::default(),
        }
    }

    /// Spends one request of `credential`'s and `team`'s budgets (the team's only if the
    /// credential's allows it, so a throttled key does not drain its team).
    pub fn check(&self, credential: &str, team: Option<&str>) -> Result<(), Exceeded> {
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

    /// Spends one request of `team`'s budget only (the credential was charged already).
    pub fn check_team(&self, team: &str) -> Result<(), Exceeded> {
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

    #[test]
    fn credential_budget_runs_out_and_reports_a_wait() {
        let limits = RateLimits::new(tight());
        assert!(limits.check("k1", None).is_ok());
        assert!(limits.check("k1", None).is_ok());
        let err = limits.check("k1", None).unwrap_err();
        assert!(err.retry_after > Duration::ZERO && err.retry_after <= Duration::from_secs(1));
        // Another credential has its own budget.
        assert!(limits.check("k2", None).is_ok());
    }

    #[test]
    fn team_budget_is_shared_by_its_credentials() {
        let limits = RateLimits::new(tight());
        assert!(limits.check("a", Some("t")).is_ok());
        assert!(limits.check("b", Some("t")).is_ok());
        assert!(limits.check("c", Some("t")).is_ok());
        assert!(limits.check("d", Some("t")).is_err());
        assert!(limits.check("e", Some("other")).is_ok());
    }
}
