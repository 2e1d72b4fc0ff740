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

use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;

/// Most entries in one list (each becomes a set element or a DNS rule).
pub const MAX_ENTRIES: usize = 1000;

/// One `allowOut` / `denyOut` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An address or CIDR (an address is a /32).
    Net(Ipv4Net),
    /// A host name, or `*.` + a domain for any of its subdomains.
    Host(HostPattern),
}

/// A host-name rule: exact, or every subdomain of `domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower-case, without a trailing dot.
    pub domain: String,
    /// `*.domain`: subdomains only.
    pub wildcard: bool,
}

impl HostPattern {
    /// Whether `name` (any case, trailing dot allowed) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.wildcard {
            name.len() > self.domain.len()
                && name.ends_with(&self.domain)
                && name.as_bytes()[name.len() - self.domain.len() - 1] == b'.'
        } else {
            name == self.domain
        }
    }
}

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "`{0}` is neither an IPv4 address, an IPv4 CIDR nor a host name (IPv6 is not supported)"
    )]
    BadEntry(String),
    #[error("{list} has {len} entries; at most {MAX_ENTRIES} are allowed")]
    TooMany { list: &'static str, len: usize },
}

impl FromStr for Destination {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let bad = || PolicyError::BadEntry(text.to_owned());
        if let Ok(addr) = text.parse::<Ipv4Addr>() {
            return Ok(Destination::Net(Ipv4Net::from(addr)));
        }
        if let Ok(net) = text.parse::<Ipv4Net>() {
            return Ok(Destination::Net(net.trunc()));
        }
        let (wildcard, domain) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        // A name, not something that looks like a mangled address or CIDR.
        let looks_numeric = domain
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
        if domain.is_empty()
            || domain.len() > 253
            || looks_numeric
            || domain.contains('/')
            || !domain.split('.').all(valid_label)
        {
            return Err(bad());
        }
        Ok(Destination::Host(HostPattern { domain, wildcard }))
    }
}

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

/// Parses one list, refusing more than [`MAX_ENTRIES`].
fn parse_list(
    list: &'static str,
    entries: &[impl AsRef<str>],
) -> Result<Vec<Destination>, PolicyError> {
    if entries.len() > MAX_ENTRIES {
        return Err(PolicyError::TooMany {
            list,
            len: entries.len(),
        });
    }
    entries.iter().map(|e| e.as_ref().parse()).collect()
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
    fn entries_parse_as_nets_or_host_patterns() {
        assert_eq!(
            "1.2.3.4".parse::<Destination>().unwrap(),
            Destination::Net("1.2.3.4/32".parse().unwrap())
        );
        assert_eq!(
            "10.1.2.3/8".parse::<Destination>().unwrap(),
            Destination::Net("10.0.0.0/8".parse().unwrap()),
            "host bits are masked off"
        );
        assert_eq!(
            "*.Example.COM.".parse::<Destination>().unwrap(),
            Destination::Host(HostPattern {
                domain: "example.com".into(),
                wildcard: true
            })
        );
        for bad in [
            "",
            "1.2.3.4/33",
            "::1",
            "2001:db8::/32",
            "a b",
            "-x.com",
            "1.2.3",
            "*.",
            "a/b",
        ] {
            assert!(bad.parse::<Destination>().is_err(), "{bad:?} accepted");
        }
        let err = EgressPolicy::parse(true, &["ok.com", "not valid"], &[] as &[&str]).unwrap_err();
        assert_eq!(err, PolicyError::BadEntry("not valid".into()));
        assert!(err.to_string().contains("not valid"));
        let many = vec!["1.1.1.1"; MAX_ENTRIES + 1];
        assert!(matches!(
            EgressPolicy::parse(true, &many, &[] as &[&str]),
            Err(PolicyError::TooMany {
                list: "allowOut",
                ..
            })
        ));
    }

    #[test]
    fn host_patterns_match_exactly_or_subdomains() {
        let exact: Destination = "example.com".parse().unwrap();
        let wild: Destination = "*.example.com".parse().unwrap();
        let (Destination::Host(exact), Destination::Host(wild)) = (exact, wild) else {
            panic!("host patterns expected");
        };
        assert!(exact.matches("EXAMPLE.com."));
        assert!(!exact.matches("www.example.com"));
        assert!(wild.matches("www.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
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
