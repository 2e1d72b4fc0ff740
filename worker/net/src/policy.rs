//! A sandbox's egress policy, as E2B expresses it (`allow_internet_access`, `network.allowOut`,
//! `network.denyOut`), parsed and checked before anything touches the host.
//!
//! Precedence, first match wins:
//! 1. destinations no sandbox may reach ([`always_blocked`], plus the worker's reserved list):
//!    link-local (cloud metadata 169.254.169.254), loopback, multicast, other sandboxes' pool
//!    range, the control plane and the worker's own addresses;
//! 2. `allowOut` (CIDRs, and the addresses its host names resolved to through the worker's DNS);
//! 3. `denyOut` (the same kinds);
//! 4. `allow_internet_access`: accept, or refuse.
//!
//! As in E2B, `allowOut` beats `denyOut`, so `denyOut: ["0.0.0.0/0"]` plus an `allowOut` list is
//! an allow-list. Refusals are `reject`s (TCP reset / ICMP unreachable) so a connection fails at
//! once instead of timing out. Host names match exactly, or with a leading `*.` any subdomain.
//!
//! The entry syntax ([`Destination`], [`HostPattern`], [`MAX_ENTRIES`]) is
//! [`roost_proto::egress`], re-exported here: control checks the same lists with it and
//! refuses bad ones before they reach a worker.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use roost_proto::egress::parse_list;
pub use roost_proto::egress::{Destination, HostPattern, MAX_ENTRIES, PolicyError};

/// A sandbox's egress policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    /// `allow_internet_access`: what happens to destinations neither list names.
    pub allow_internet: bool,
    /// `network.allowOut`.
    pub allow_out: Vec<Destination>,
    /// `network.denyOut`.
    pub deny_out: Vec<Destination>,
}

/// What the policy says about one destination or name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject,
}

impl EgressPolicy {
    /// Internet on, no lists.
    pub fn open() -> Self {
        Self {
            allow_internet: true,
            ..Self::default()
        }
    }

    /// Parses E2B-style lists.
    pub fn parse(
        allow_internet: bool,
        allow_out: &[impl AsRef<str>],
        deny_out: &[impl AsRef<str>],
    ) -> Result<Self, PolicyError> {
        Ok(Self {
            allow_internet,
            allow_out: parse_list("allowOut", allow_out)?,
            deny_out: parse_list("denyOut", deny_out)?,
        })
    }

    /// CIDRs of `allowOut`.
    pub fn allow_nets(&self) -> Vec<Ipv4Net> {
        nets(&self.allow_out)
    }

    /// CIDRs of `denyOut`.
    pub fn deny_nets(&self) -> Vec<Ipv4Net> {
        nets(&self.deny_out)
    }

    /// What the DNS forwarder does with a query for `name`: an allowed name is resolved and its
    /// addresses admitted; a denied one is refused (its addresses would be refused anyway); any
    /// other name is resolved only when the internet is on (with it off, DNS would be a way out).
    pub fn name_verdict(&self, name: &str) -> NameVerdict {
        if hosts(&self.allow_out).any(|p| p.matches(name)) {
            NameVerdict::ResolveAndAdmit
        } else if hosts(&self.deny_out).any(|p| p.matches(name)) {
            NameVerdict::Refuse
        } else if self.allow_internet {
            NameVerdict::Resolve
        } else {
            NameVerdict::Refuse
        }
    }

    /// What the rules decide for `addr`, given the addresses DNS admitted and the host names
    /// it resolved to denied ones (the same order the nftables chain uses; for tests and docs).
    pub fn verdict(
        &self,
        addr: Ipv4Addr,
        blocked: &[Ipv4Net],
        dns_admitted: &[Ipv4Addr],
    ) -> Verdict {
        if blocked.iter().any(|n| n.contains(&addr)) {
            Verdict::Reject
        } else if self.allow_nets().iter().any(|n| n.contains(&addr))
            || dns_admitted.contains(&addr)
        {
            Verdict::Accept
        } else if self.deny_nets().iter().any(|n| n.contains(&addr)) {
            Verdict::Reject
        } else if self.allow_internet {
            Verdict::Accept
        } else {
            Verdict::Reject
        }
    }
}

/// The DNS forwarder's decision for one query name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameVerdict {
    /// Forward upstream; admit the answer's addresses (an `allowOut` host name).
    ResolveAndAdmit,
    /// Forward upstream; the addresses get the policy's default.
    Resolve,
    /// Answer REFUSED without asking upstream.
    Refuse,
}

fn nets(list: &[Destination]) -> Vec<Ipv4Net> {
    list.iter()
        .filter_map(|d| match d {
            Destination::Net(n) => Some(*n),
            Destination::Host(_) => None,
        })
        .collect()
}

fn hosts(list: &[Destination]) -> impl Iterator<Item = &HostPattern> {
    list.iter().filter_map(|d| match d {
        Destination::Host(h) => Some(h),
        Destination::Net(_) => None,
    })
}

/// Destinations no sandbox may reach whatever its policy: "this network", loopback, link-local
/// (cloud metadata services), multicast and reserved space, and the pool range (other
/// sandboxes and the host ends of their veths).
pub fn always_blocked(pool_range: Ipv4Net) -> Vec<Ipv4Net> {
    let fixed = [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ];
    fixed
        .iter()
        .filter_map(|n| n.parse().ok())
        .chain(std::iter::once(pool_range.trunc()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_checks_both_lists_with_the_shared_syntax() {
        let policy =
            EgressPolicy::parse(true, &["10.1.2.3/8", "*.pypi.org"], &["0.0.0.0/0"]).unwrap();
        assert_eq!(policy.allow_nets(), vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(policy.deny_nets(), vec!["0.0.0.0/0".parse().unwrap()]);
        assert_eq!(
            policy.name_verdict("files.pypi.org"),
            NameVerdict::ResolveAndAdmit
        );
        let err = EgressPolicy::parse(true, &["ok.com", "not valid"], &[] as &[&str]).unwrap_err();
        assert_eq!(err, PolicyError::BadEntry("not valid".into()));
        let err = EgressPolicy::parse(true, &[] as &[&str], &["ok.com", "::1"]).unwrap_err();
        assert_eq!(err, PolicyError::BadEntry("::1".into()));
        let many = vec!["1.1.1.1"; MAX_ENTRIES + 1];
        assert!(matches!(
            EgressPolicy::parse(true, &many, &[] as &[&str]),
            Err(PolicyError::TooMany {
                list: "allowOut",
                ..
            })
        ));
        assert!(matches!(
            EgressPolicy::parse(true, &[] as &[&str], &many),
            Err(PolicyError::TooMany {
                list: "denyOut",
                ..
            })
        ));
    }

    #[test]
    fn allow_beats_deny_and_blocked_beats_everything() {
        let range = "10.213.0.0/16".parse().unwrap();
        let blocked = always_blocked(range);
        let policy = EgressPolicy::parse(
            false,
            &["198.51.100.0/24", "169.254.169.254", "api.example.com"],
            &["0.0.0.0/0"],
        )
        .unwrap();
        assert_eq!(
            policy.verdict(ip("198.51.100.7"), &blocked, &[]),
            Verdict::Accept
        );
        assert_eq!(
            policy.verdict(ip("203.0.113.1"), &blocked, &[]),
            Verdict::Reject
        );
        assert_eq!(
            policy.verdict(ip("203.0.113.1"), &blocked, &[ip("203.0.113.1")]),
            Verdict::Accept,
            "an address DNS admitted for an allowed name"
        );
        assert_eq!(
            policy.verdict(ip("169.254.169.254"), &blocked, &[]),
            Verdict::Reject,
            "metadata stays blocked even when allowed"
        );
        assert_eq!(
            policy.verdict(ip("10.213.0.6"), &blocked, &[]),
            Verdict::Reject
        );

        let open = EgressPolicy::parse(true, &[] as &[&str], &["192.0.2.0/24"]).unwrap();
        assert_eq!(
            open.verdict(ip("192.0.2.1"), &blocked, &[]),
            Verdict::Reject
        );
        assert_eq!(open.verdict(ip("8.8.8.8"), &blocked, &[]), Verdict::Accept);
        assert_eq!(
            open.verdict(ip("127.0.0.1"), &blocked, &[]),
            Verdict::Reject
        );
        let closed = EgressPolicy::default();
        assert_eq!(
            closed.verdict(ip("8.8.8.8"), &blocked, &[]),
            Verdict::Reject
        );
    }

    #[test]
    fn dns_follows_the_same_precedence() {
        let policy = EgressPolicy::parse(false, &["*.allowed.test"], &["evil.test"]).unwrap();
        assert_eq!(
            policy.name_verdict("www.allowed.test"),
            NameVerdict::ResolveAndAdmit
        );
        assert_eq!(policy.name_verdict("evil.test"), NameVerdict::Refuse);
        assert_eq!(
            policy.name_verdict("other.test"),
            NameVerdict::Refuse,
            "internet off: no lookups for names nobody allowed"
        );
        let open = EgressPolicy::parse(true, &[] as &[&str], &["evil.test"]).unwrap();
        assert_eq!(open.name_verdict("other.test"), NameVerdict::Resolve);
        assert_eq!(open.name_verdict("EVIL.test."), NameVerdict::Refuse);
    }
}
