//! Sandbox list filters shared by the native and E2B list routes.
//!
//! `metadata` is one query parameter holding a URL-encoded query string of its own
//! (`metadata=user%3Dalice%26env%3Dprod`), as the E2B SDKs send it. Each pair becomes an exact
//! equality match in SQL, so `%`, `_` and quotes in keys or values are just characters.
//! `state` may be repeated or comma-separated.

use super::error::ApiError;
use super::extract::query_pairs;
use crate::lifecycle::SandboxState;
use crate::lifecycle::service::MAX_METADATA_PAIRS;

pub fn metadata(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let pairs = query_pairs(Some(raw)).map_err(|_| {
        ApiError::bad_request("metadata filter must be a URL-encoded key=value list")
    })?;
    if pairs.len() > MAX_METADATA_PAIRS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_METADATA_PAIRS} metadata filters are allowed"
        )));
    }
    if pairs.iter().any(|(k, _)| k.is_empty()) {
        return Err(ApiError::bad_request(
            "metadata filter keys must not be empty",
        ));
    }
    Ok(pairs)
}

/// Parses one `state` value (possibly comma-separated) into `out`, among `allowed`.
pub fn states(
    raw: &str,
    allowed: &[SandboxState],
    out: &mut Vec<SandboxState>,
) -> Result<(), ApiError> {
    for name in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let state = name
            .parse::<SandboxState>()
            .ok()
            .filter(|s| allowed.contains(s))
            .ok_or_else(|| ApiError::bad_request(format!("unknown sandbox state {name:?}")))?;
        if !out.contains(&state) {
            out.push(state);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filter_keeps_metacharacters_literal() {
        let pairs = metadata("a%25=b_%27&c=d").unwrap();
        assert_eq!(
            pairs,
            vec![("a%".into(), "b_'".into()), ("c".into(), "d".into())]
        );
        assert!(metadata("=x").is_err());
    }

    #[test]
    fn states_accept_commas_and_reject_unknown_names() {
        let mut out = Vec::new();
        states("running,paused", &SandboxState::ALL, &mut out).unwrap();
        states("running", &SandboxState::ALL, &mut out).unwrap();
        assert_eq!(out, vec![SandboxState::Running, SandboxState::Paused]);
        assert!(states("sleeping", &SandboxState::ALL, &mut out).is_err());
        assert!(states("killed", &[SandboxState::Running], &mut out).is_err());
    }
}
