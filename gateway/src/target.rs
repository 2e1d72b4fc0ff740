//! Where a request goes, decided from its host and headers alone (no I/O).
//!
//! E2B's SDKs address a sandbox port in two ways: the host name `<port>-<id>.<domain>`, or, when
//! everything is sent to one address (localhost, an IP literal or `sandbox.<domain>`), the
//! headers `E2b-Sandbox-Id` and `E2b-Sandbox-Port`. `api.<domain>` is the control plane. This
//! module turns those into a typed [`Target`] or a [`TargetError`] whose status and message go
//! back to the client, so the proxy never handles raw host strings.

use std::net::IpAddr;
use std::str::FromStr;

use http::HeaderMap;
use roost_proto::ids::{IdError, SandboxId};

/// Header naming the sandbox when the host does not.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// Header naming the sandbox port when the host does not.
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

/// How a sandbox target was addressed (kept for access logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// `<port>-<id>.<domain>`.
    Host,
    /// `E2b-Sandbox-Id` / `E2b-Sandbox-Port` on a localhost, IP or `sandbox.<domain>` host.
    Headers,
}

/// A port inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxTarget {
    pub sandbox: SandboxId,
    pub port: u16,
    pub addressing: Addressing,
}

/// The destination of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The control plane's REST API (`api.<domain>`, or a localhost/IP host without sandbox
    /// headers).
    Control,
    /// A port inside a sandbox, through the tunnel of the worker hosting it.
    Sandbox(SandboxTarget),
}

/// Why a request has no target. Every variant is the client's fault (4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the request has no Host header")]
    MissingHost,
    #[error("the Host header {0:?} is not a valid host name")]
    MalformedHost(String),
    #[error("this gateway does not serve the host {0:?}")]
    UnknownHost(String),
    #[error("{0:?} is not a port number between 1 and 65535")]
    BadPort(String),
    #[error("invalid sandbox id {id:?}: {source}")]
    BadSandboxId {
        id: String,
        #[source]
        source: IdError,
    },
    #[error("the host {0:?} needs `<port>-<sandbox id>` before the domain")]
    MalformedSandboxLabel(String),
    #[error(
        "header `{0}` is missing (the host routes by the E2b-Sandbox-Id/E2b-Sandbox-Port headers)"
    )]
    MissingHeader(&'static str),
    #[error("header `{0}` is not valid text")]
    UnreadableHeader(&'static str),
}

impl TargetError {
    /// The HTTP status the client gets: 404 for a host we do not serve, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            TargetError::UnknownHost(_) => 404,
            _ => 400,
        }
    }
}

/// Decides targets for one domain (e.g. `roost.example.com`).
#[derive(Debug, Clone)]
pub struct Router {
    domain: String,
    api_host: String,
    sandbox_host: String,
}

impl Router {
    /// `domain` is the bare domain, without scheme or port; it is matched case-insensitively.
    pub fn new(domain: &str) -> Self {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        Self {
            api_host: format!("api.{domain}"),
            sandbox_host: format!("sandbox.{domain}"),
            domain,
        }
    }

    /// The domain this router serves.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Target of a request given its authority (`Host` header or h2 `:authority`, with or
    /// without a port) and its headers.
    pub fn route(
        &self,
        authority: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Target, TargetError> {
        let authority = authority.ok_or(TargetError::MissingHost)?;
        let host = host_name(authority)?;
        if host == self.api_host {
            return Ok(Target::Control);
        }
        if host == self.sandbox_host {
            return sandbox_from_headers(headers)?
                .ok_or(TargetError::MissingHeader(SANDBOX_ID_HEADER));
        }
        if is_local_host(&host) {
            // Plain mode: one address serves both the API and the sandboxes; the sandbox
            // headers tell them apart.
            return Ok(sandbox_from_headers(headers)?.unwrap_or(Target::Control));
        }
        let Some(label) = host
            .strip_suffix(self.domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
        else {
            return Err(TargetError::UnknownHost(host));
        };
        if label.is_empty() || label.contains('.') {
            return Err(TargetError::UnknownHost(host));
        }
        sandbox_from_label(label).map(Target::Sandbox)
    }
}

/// The lowercase host name of an authority: the port and IPv6 brackets removed, one trailing
/// dot allowed.
fn host_name(authority: &str) -> Result<String, TargetError> {
    let malformed = || TargetError::MalformedHost(authority.to_owned());
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(malformed)?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port_digits)) {
            return Err(malformed());
        }
        inside
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| malformed())?;
        return Ok(inside.to_ascii_lowercase());
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if is_port_digits(port) => host,
            Some(_) => return Err(malformed()),
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty()
        || host.len() > 253
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        || host
            .split('.')
            .any(|label| label.is_empty() || label.len() > 63)
    {
        return Err(malformed());
    }
    Ok(host.to_ascii_lowercase())
}

fn is_port_digits(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// `localhost` or an IP literal.
fn is_local_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok()
}

/// `<port>-<id>`, split at the first `-` as the E2B SDK builds it.
fn sandbox_from_label(label: &str) -> Result<SandboxTarget, TargetError> {
    let (port, id) = label
        .split_once('-')
        .ok_or_else(|| TargetError::MalformedSandboxLabel(label.to_owned()))?;
    Ok(SandboxTarget {
        port: parse_port(port)?,
        sandbox: parse_id(id)?,
        addressing: Addressing::Host,
    })
}

fn sandbox_from_headers(headers: &HeaderMap) -> Result<Option<Target>, TargetError> {
    let id = header_text(headers, SANDBOX_ID_HEADER)?;
    let port = header_text(headers, SANDBOX_PORT_HEADER)?;
    match (id, port) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(TargetError::MissingHeader(SANDBOX_PORT_HEADER)),
        (None, Some(_)) => Err(TargetError::MissingHeader(SANDBOX_ID_HEADER)),
        (Some(id), Some(port)) => Ok(Some(Target::Sandbox(SandboxTarget {
            sandbox: parse_id(id.trim())?,
            port: parse_port(port.trim())?,
            addressing: Addressing::Headers,
        }))),
    }
}

fn header_text<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<Option<&'a str>, TargetError> {
    headers
        .get(name)
        .map(|v| v.to_str().map_err(|_| TargetError::UnreadableHeader(name)))
        .transpose()
}

/// A port in canonical decimal form (no sign, no leading zero), 1–65535.
pub fn parse_port(s: &str) -> Result<u16, TargetError> {
    let bad = || TargetError::BadPort(s.to_owned());
    if !is_port_digits(s) || s.starts_with('0') {
        return Err(bad());
    }
    match s.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(bad()),
    }
}

fn parse_id(s: &str) -> Result<SandboxId, TargetError> {
    // Host names are case-insensitive; ids are lowercase, so a folded host still names the
    // same sandbox. Header values are taken as sent.
    SandboxId::from_str(s).map_err(|source| TargetError::BadSandboxId {
        id: s.chars().take(80).collect(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn router() -> Router {
        Router::new("roost.test")
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn sandbox(id: &str, port: u16, addressing: Addressing) -> Target {
        Target::Sandbox(SandboxTarget {
            sandbox: id.parse().unwrap(),
            port,
            addressing,
        })
    }

    #[test]
    fn api_host_goes_to_control() {
        let none = HeaderMap::new();
        assert_eq!(
            router().route(Some("api.roost.test"), &none),
            Ok(Target::Control)
        );
        assert_eq!(
            router().route(Some("API.Roost.Test:8443"), &none),
            Ok(Target::Control)
        );
        assert_eq!(
            router().route(Some("api.roost.test."), &none),
            Ok(Target::Control)
        );
    }

    #[test]
    fn port_and_id_in_host() {
        let none = HeaderMap::new();
        assert_eq!(
            router().route(Some("49983-cl-abc123.roost.test"), &none),
            Ok(sandbox("cl-abc123", 49983, Addressing::Host))
        );
        assert_eq!(
            router().route(Some("8080-CL-ABC.roost.test:443"), &none),
            Ok(sandbox("cl-abc", 8080, Addressing::Host))
        );
        assert_eq!(
            router().route(Some("1-cl-0.roost.test"), &none),
            Ok(sandbox("cl-0", 1, Addressing::Host))
        );
        assert_eq!(
            router().route(Some("65535-cl-z.roost.test"), &none),
            Ok(sandbox("cl-z", 65535, Addressing::Host))
        );
    }

    #[test]
    fn bad_ports_in_host() {
        let none = HeaderMap::new();
        for host in [
            "0-cl-abc.roost.test",
            "65536-cl-abc.roost.test",
            "99999-cl-abc.roost.test",
            "080-cl-abc.roost.test",
            "x80-cl-abc.roost.test",
            "-cl-abc.roost.test",
            "123456-cl-abc.roost.test",
        ] {
            let err = router().route(Some(host), &none).unwrap_err();
            assert!(matches!(err, TargetError::BadPort(_)), "{host}: {err:?}");
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn bad_ids_in_host() {
        let none = HeaderMap::new();
        for host in [
            "80-abc.roost.test",
            "80-cl-.roost.test",
            "80-cl-a-b.roost.test",
            "80-xx-abc.roost.test",
        ] {
            let err = router().route(Some(host), &none).unwrap_err();
            assert!(
                matches!(err, TargetError::BadSandboxId { .. }),
                "{host}: {err:?}"
            );
        }
        let long = format!("80-cl-{}.roost.test", "a".repeat(41));
        assert!(matches!(
            router().route(Some(&long), &none),
            Err(TargetError::BadSandboxId {
                source: IdError::TooLong,
                ..
            })
        ));
        assert!(matches!(
            router().route(Some("8080.roost.test"), &none),
            Err(TargetError::MalformedSandboxLabel(_))
        ));
    }

    #[test]
    fn unknown_and_malformed_hosts() {
        let none = HeaderMap::new();
        for host in [
            "example.com",
            "roost.test",
            "a.b.roost.test",
            "evilroost.test",
            "80-cl-a.roost.test.evil",
        ] {
            let err = router().route(Some(host), &none).unwrap_err();
            assert!(
                matches!(err, TargetError::UnknownHost(_)),
                "{host}: {err:?}"
            );
            assert_eq!(err.status(), 404);
        }
        for host in [
            "",
            "a b",
            "api.roost.test:x",
            "[::1",
            "[zz]:80",
            "a..b",
            "host:123456",
            "ho_st",
        ] {
            let err = router().route(Some(host), &none).unwrap_err();
            assert!(
                matches!(err, TargetError::MalformedHost(_)),
                "{host:?}: {err:?}"
            );
        }
        assert_eq!(router().route(None, &none), Err(TargetError::MissingHost));
    }

    #[test]
    fn headers_route_on_local_and_ip_hosts() {
        let h = headers(&[
            (SANDBOX_ID_HEADER, "cl-xyz"),
            (SANDBOX_PORT_HEADER, "49999"),
        ]);
        for host in [
            "localhost",
            "localhost:3000",
            "127.0.0.1:80",
            "[::1]:8080",
            "10.0.0.7",
            "sandbox.roost.test",
        ] {
            assert_eq!(
                router().route(Some(host), &h),
                Ok(sandbox("cl-xyz", 49999, Addressing::Headers)),
                "{host}"
            );
        }
        // The sandbox headers do not redirect a request for a named host.
        assert_eq!(
            router().route(Some("api.roost.test"), &h),
            Ok(Target::Control)
        );
        assert_eq!(
            router().route(Some("80-cl-a.roost.test"), &h),
            Ok(sandbox("cl-a", 80, Addressing::Host))
        );
    }

    #[test]
    fn local_host_without_headers_is_the_api() {
        let none = HeaderMap::new();
        assert_eq!(
            router().route(Some("127.0.0.1:3000"), &none),
            Ok(Target::Control)
        );
        assert_eq!(
            router().route(Some("localhost"), &none),
            Ok(Target::Control)
        );
        assert_eq!(
            router().route(Some("sandbox.roost.test"), &none),
            Err(TargetError::MissingHeader(SANDBOX_ID_HEADER))
        );
    }

    #[test]
    fn bad_sandbox_headers() {
        let only_id = headers(&[(SANDBOX_ID_HEADER, "cl-a")]);
        assert_eq!(
            router().route(Some("localhost"), &only_id),
            Err(TargetError::MissingHeader(SANDBOX_PORT_HEADER))
        );
        let only_port = headers(&[(SANDBOX_PORT_HEADER, "80")]);
        assert_eq!(
            router().route(Some("localhost"), &only_port),
            Err(TargetError::MissingHeader(SANDBOX_ID_HEADER))
        );
        for port in ["0", "65536", "-1", "80a", ""] {
            let h = headers(&[(SANDBOX_ID_HEADER, "cl-a"), (SANDBOX_PORT_HEADER, port)]);
            assert!(
                matches!(
                    router().route(Some("localhost"), &h),
                    Err(TargetError::BadPort(_))
                ),
                "{port:?}"
            );
        }
        let h = headers(&[(SANDBOX_ID_HEADER, "cl-A"), (SANDBOX_PORT_HEADER, "80")]);
        assert!(matches!(
            router().route(Some("localhost"), &h),
            Err(TargetError::BadSandboxId { .. })
        ));
        let mut h = headers(&[(SANDBOX_PORT_HEADER, "80")]);
        h.insert(
            SANDBOX_ID_HEADER,
            HeaderValue::from_bytes(b"cl-\xff").unwrap(),
        );
        assert_eq!(
            router().route(Some("localhost"), &h),
            Err(TargetError::UnreadableHeader(SANDBOX_ID_HEADER))
        );
    }

    #[test]
    fn parse_port_range() {
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
        for bad in ["0", "65536", "00080", "+80", " 80", "1e3", ""] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }
}
