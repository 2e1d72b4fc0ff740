//! The `identity` operation (protocol version 3): after a snapshot restore every clone of a
//! template wakes up with the template's hostname, environment, access token, random state and
//! a stale clock. The worker sends each clone its own with one request; the agent applies all
//! of it or nothing (the request is checked before anything changes) and answers
//! [`IdentityApplied`], which says what it changed.
//!
//! Entropy travels base64-encoded in the JSON request: it is a few dozen bytes, so a data
//! frame would buy nothing and would split one request into a sequence.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Fewest random bytes an identity request may carry: 256 bits, what the kernel's CRNG needs
/// to be fully seeded.
pub const MIN_ENTROPY_BYTES: usize = 32;
/// Most random bytes an identity request may carry.
pub const MAX_ENTROPY_BYTES: usize = 4096;

/// Who a (restored) sandbox is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRequest {
    pub sandbox_id: String,
    /// Set with `sethostname`; an RFC 1123 name of at most 64 bytes.
    pub hostname: String,
    /// Added to (or replacing) envd's variables for every process, as envd's `POST /init`.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Required afterwards in `X-Access-Token` by envd and the code interpreter; `None` keeps
    /// the current one, an empty string turns the check off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Fresh random bytes from the host ([`MIN_ENTROPY_BYTES`] to [`MAX_ENTROPY_BYTES`]),
    /// credited to the guest's pool before the CRNG is reseeded.
    #[serde(with = "base64_bytes")]
    pub entropy: Vec<u8>,
    /// The host's wall clock when it sent the request, nanoseconds since the Unix epoch.
    pub wall_clock_unix_ns: u64,
}

impl IdentityRequest {
    /// A request with `entropy` freshly read from the host's `getrandom` and the current wall
    /// clock.
    pub fn new(
        sandbox_id: impl Into<String>,
        hostname: impl Into<String>,
    ) -> Result<Self, getrandom::Error> {
        let mut entropy = vec![0u8; MIN_ENTROPY_BYTES * 2];
        getrandom::fill(&mut entropy)?;
        Ok(Self {
            sandbox_id: sandbox_id.into(),
            hostname: hostname.into(),
            env_vars: BTreeMap::new(),
            access_token: None,
            entropy,
            wall_clock_unix_ns: now_unix_ns(),
        })
    }
}

/// Nanoseconds since the Unix epoch (0 for a clock set before 1970).
pub fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Secrets stay out of logs: the token and the entropy are shown by length only.
impl std::fmt::Debug for IdentityRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityRequest")
            .field("sandbox_id", &self.sandbox_id)
            .field("hostname", &self.hostname)
            .field("env_vars", &self.env_vars.keys().collect::<Vec<_>>())
            .field("access_token", &self.access_token.as_ref().map(|_| "<set>"))
            .field("entropy_bytes", &self.entropy.len())
            .field("wall_clock_unix_ns", &self.wall_clock_unix_ns)
            .finish()
    }
}

/// What the agent changed. An agent running as an ordinary process (tests) leaves the
/// machine-wide settings it was not told to touch alone and says so here; as PID 1 of a VM
/// every field but `interpreter` is always true.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityApplied {
    pub hostname: bool,
    /// The entropy was credited and the CRNG reseeded.
    pub entropy: bool,
    pub clock: bool,
    /// How far the clock was stepped (new minus old), in nanoseconds; 0 when not set.
    #[serde(default)]
    pub clock_step_ns: i64,
    /// envd took the id, variables and token (always true on success).
    pub envd: bool,
    /// The code interpreter took the token (false where no interpreter runs).
    pub interpreter: bool,
}

/// Bytes as a standard base64 string (RFC 4648, with padding).
mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("entropy is not base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_request_has_fresh_entropy_and_the_current_clock() {
        let a = IdentityRequest::new("sb1", "host1").unwrap();
        let b = IdentityRequest::new("sb1", "host1").unwrap();
        assert!(a.entropy.len() >= MIN_ENTROPY_BYTES);
        assert_ne!(a.entropy, b.entropy);
        let now = now_unix_ns();
        assert!(now - a.wall_clock_unix_ns < 60_000_000_000, "{a:?}");
    }

    #[test]
    fn json_carries_entropy_as_base64_and_debug_hides_secrets() {
        let mut request = IdentityRequest::new("sb1", "host1").unwrap();
        request.entropy = b"foobar".to_vec();
        request.access_token = Some("s3cret".into());
        let json = serde_json::to_string(&request).unwrap();
        assert!(json.contains(r#""entropy":"Zm9vYmFy""#), "{json}");
        assert_eq!(
            serde_json::from_str::<IdentityRequest>(&json).unwrap(),
            request
        );
        let debug = format!("{request:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("foobar"),
            "{debug}"
        );
        let bad = json.replace("Zm9vYmFy", "not base64!");
        let error = serde_json::from_str::<IdentityRequest>(&bad).unwrap_err();
        assert!(
            error.to_string().contains("entropy is not base64"),
            "{error}"
        );
    }
}
