//! The syntax of E2B's egress lists (`network.allowOut`, `network.denyOut`): what one entry may
//! be, and how many a list may hold.
//!
//! It lives here so that control refuses a bad list with a 400 before anything is stored, and
//! the worker parses the same lists the same way when it builds the sandbox's rules
//! (`roost_net::EgressPolicy`). Both ends pass the strings as the user wrote them; this module
//! only decides whether they are valid and what they mean.
//!
//! An entry is an IPv4 address (a /32), an IPv4 CIDR (host bits are masked off), a host name
//! (matched exactly), or `*.` + a domain (any of its subdomains). IPv6 is refused.

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

/// Why an egress list was refused.
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

/// Parses one list named `list` (for the error message, e.g. `"allowOut"`), refusing more than
/// [`MAX_ENTRIES`] entries and naming the first entry that is not valid.
pub fn parse_list(
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            " pypi.org ".parse::<Destination>().unwrap(),
            Destination::Host(HostPattern {
                domain: "pypi.org".into(),
                wildcard: false
            }),
            "surrounding blanks are ignored"
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
            "not a host!",
        ] {
            assert!(bad.parse::<Destination>().is_err(), "{bad:?} accepted");
        }
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
    fn parse_list_keeps_order_and_names_the_bad_entry() {
        let parsed = parse_list("allowOut", &["10.0.0.0/8", "*.pypi.org", "1.1.1.1"]).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0], Destination::Net("10.0.0.0/8".parse().unwrap()));
        assert!(matches!(&parsed[1], Destination::Host(h) if h.wildcard && h.domain == "pypi.org"));
        assert!(parse_list("denyOut", &[] as &[&str]).unwrap().is_empty());

        let err = parse_list("allowOut", &["ok.com", "not a host!"]).unwrap_err();
        assert_eq!(err, PolicyError::BadEntry("not a host!".into()));
        assert!(err.to_string().contains("`not a host!`"), "{err}");
    }

    #[test]
    fn parse_list_refuses_more_than_max_entries() {
        let full = vec!["1.1.1.1"; MAX_ENTRIES];
        assert_eq!(parse_list("denyOut", &full).unwrap().len(), MAX_ENTRIES);
        let many = vec!["1.1.1.1"; MAX_ENTRIES + 1];
        let err = parse_list("denyOut", &many).unwrap_err();
        assert_eq!(
            err,
            PolicyError::TooMany {
                list: "denyOut",
                len: MAX_ENTRIES + 1
            }
        );
        assert!(
            err.to_string().starts_with("denyOut has 1001 entries"),
            "{err}"
        );
    }
}
