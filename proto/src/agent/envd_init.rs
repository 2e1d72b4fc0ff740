//! The body of envd's `POST /init`, which the worker sends through a forward to the envd init
//! socket ([`super::ForwardRequest::EnvdInit`]) to hand a sandbox its identity.
//!
//! Field names are envd's (camelCase JSON); absent fields leave the sandbox's setting as it is.
//! The agent's envd (`rootfs/agent/src/envd/admin.rs`) parses the same shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What `POST /init` sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Added to (or replacing) the sandbox's environment for every process it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Token that requests to the envd API must then carry in `X-Access-Token`; an empty one
    /// turns the check off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    /// Absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// The host's wall clock, RFC 3339 (`2026-11-29T14:00:00Z`): a restored snapshot's clock is
    /// stale. Only the VM's init sets the clock from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_envd_field_names_and_omits_absent_fields() {
        let request = InitRequest {
            sandbox_id: Some("sb1".into()),
            env_vars: Some(BTreeMap::from([("A".into(), "1".into())])),
            access_token: Some("tok".into()),
            default_workdir: Some("/home/user".into()),
            ..InitRequest::default()
        };
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(
            json,
            r#"{"sandboxId":"sb1","envVars":{"A":"1"},"accessToken":"tok","defaultWorkdir":"/home/user"}"#
        );
        assert_eq!(serde_json::from_str::<InitRequest>(&json).unwrap(), request);
        assert_eq!(
            serde_json::to_string(&InitRequest::default()).unwrap(),
            "{}"
        );
    }
}
