//! `--forward HOST:GUEST`: a TCP port of this machine's loopback that reaches a port inside
//! the host VM (QEMU user networking `hostfwd`).

use std::fmt;
use std::str::FromStr;

/// One forwarded TCP port: `127.0.0.1:host` on this machine → `guest` inside the host VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
}

/// A `--forward` value that is not `HOST:GUEST`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad port forward `{value}`: {reason} (expected HOST:GUEST, e.g. 8080:80)")]
pub struct ForwardParseError {
    value: String,
    reason: &'static str,
}

impl FromStr for Forward {
    type Err = ForwardParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason| ForwardParseError {
            value: value.to_owned(),
            reason,
        };
        let (host, guest) = value.split_once(':').ok_or_else(|| err("no `:`"))?;
        let port = |text: &str| -> Result<u16, ForwardParseError> {
            match text.trim().parse::<u16>() {
                Ok(0) => Err(err("port 0 cannot be forwarded")),
                Ok(port) => Ok(port),
                Err(_) => Err(err("ports are numbers from 1 to 65535")),
            }
        };
        Ok(Self {
            host: port(host)?,
            guest: port(guest)?,
        })
    }
}

impl Forward {
    /// The `hostfwd=` value for QEMU's user network backend.
    pub fn hostfwd(&self) -> String {
        format!("tcp:127.0.0.1:{}-:{}", self.host, self.guest)
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_and_guest_ports() {
        let fwd: Forward = "8080:80".parse().unwrap();
        assert_eq!(
            fwd,
            Forward {
                host: 8080,
                guest: 80
            }
        );
        assert_eq!(fwd.hostfwd(), "tcp:127.0.0.1:8080-:80");
        assert_eq!(fwd.to_string(), "8080:80");
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "8080", "a:80", "8080:", ":80", "0:80", "80:0", "70000:80", "1:2:3",
        ] {
            let err = bad.parse::<Forward>().unwrap_err();
            assert!(err.to_string().contains("HOST:GUEST"), "{bad}: {err}");
        }
    }
}
