//! Checks on an identity request before anything is changed: a bad request must leave the
//! guest as it was.

use roost_proto::agent::IdentityRequest;
use roost_proto::agent::identity::{MAX_ENTROPY_BYTES, MIN_ENTROPY_BYTES};

use crate::init::hostname::{self, HostnameError};
use crate::interpreter::env_vars::{self, InvalidEnvVar};

/// Longest sandbox id accepted.
const MAX_SANDBOX_ID_LEN: usize = 128;
/// Longest access token accepted.
const MAX_TOKEN_LEN: usize = 4096;
/// 2020-01-01T00:00:00Z: a host clock before this is wrong, not a time to set.
const EARLIEST_CLOCK_NS: u64 = 1_577_836_800_000_000_000;

/// Why an identity request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIdentity {
    #[error("sandbox_id must be 1-{MAX_SANDBOX_ID_LEN} letters, digits, `-`, `_` or `.`: {0:?}")]
    SandboxId(String),
    #[error("hostname {name:?}: {source}")]
    Hostname {
        name: String,
        #[source]
        source: HostnameError,
    },
    #[error("env_vars: {0}")]
    EnvVar(#[from] InvalidEnvVar),
    #[error("access_token must be at most {MAX_TOKEN_LEN} printable ASCII characters")]
    AccessToken,
    #[error(
        "entropy: {0} bytes given; {MIN_ENTROPY_BYTES} to {MAX_ENTROPY_BYTES} bytes are required"
    )]
    Entropy(usize),
    #[error("wall_clock_unix_ns {0} is before 2020-01-01: the host's clock is wrong")]
    Clock(u64),
}

/// Checks every field of `request`.
pub fn validate(request: &IdentityRequest) -> Result<(), InvalidIdentity> {
    let id = &request.sandbox_id;
    if id.is_empty()
        || id.len() > MAX_SANDBOX_ID_LEN
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(InvalidIdentity::SandboxId(id.clone()));
    }
    hostname::validate(&request.hostname).map_err(|source| InvalidIdentity::Hostname {
        name: request.hostname.clone(),
        source,
    })?;
    env_vars::validate(&request.env_vars)?;
    if let Some(token) = &request.access_token
        && (token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(InvalidIdentity::AccessToken);
    }
    if !(MIN_ENTROPY_BYTES..=MAX_ENTROPY_BYTES).contains(&request.entropy.len()) {
        return Err(InvalidIdentity::Entropy(request.entropy.len()));
    }
    if request.wall_clock_unix_ns < EARLIEST_CLOCK_NS {
        return Err(InvalidIdentity::Clock(request.wall_clock_unix_ns));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> IdentityRequest {
        IdentityRequest::new("sb-1", "clone-1").unwrap()
    }

    #[test]
    fn a_fresh_request_passes() {
        validate(&valid()).unwrap();
        let mut request = valid();
        request.access_token = Some("tok-1".into());
        request.env_vars.insert("A".into(), "x y".into());
        validate(&request).unwrap();
    }

    #[test]
    fn every_field_is_checked() {
        type Breaker = fn(&mut IdentityRequest);
        let cases: Vec<(Breaker, &str)> = vec![
            (|r| r.sandbox_id.clear(), "sandbox_id"),
            (|r| r.sandbox_id = "a/../b".into(), "sandbox_id"),
            (|r| r.hostname = "bad_name".into(), "hostname \"bad_name\""),
            (|r| r.hostname = String::new(), "hostname"),
            (
                |r| {
                    r.env_vars.insert("A=B".into(), "1".into());
                },
                "env_vars",
            ),
            (|r| r.access_token = Some("a\r\nb".into()), "access_token"),
            (|r| r.entropy.truncate(31), "31 bytes given"),
            (|r| r.entropy = vec![0; 4097], "4097 bytes given"),
            (|r| r.wall_clock_unix_ns = 0, "before 2020"),
        ];
        for (break_it, expected) in cases {
            let mut request = valid();
            break_it(&mut request);
            let error = validate(&request).unwrap_err().to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }
}
