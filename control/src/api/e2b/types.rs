//! E2B wire types, with E2B's key spellings (`sandboxID`, `memoryMB`, ...).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::time::rfc3339;
use crate::lifecycle::SandboxState;
use crate::placement::MetricSample;
use crate::store::sandboxes::Sandbox;

/// Body of `POST /sandboxes` and `POST /v2/sandboxes`. Unknown fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds; default 300.
    pub timeout: Option<u64>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub auto_pause: Option<bool>,
    pub secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    pub network: Option<NetworkConfig>,
}

/// `network` of the create body. Unknown fields (`maskRequestHost`) are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// `false`: ports other than envd's need the `e2b-traffic-access-token` header with the
    /// sandbox's `trafficAccessToken` (default true).
    pub allow_public_traffic: Option<bool>,
    /// Destinations the sandbox may reach whatever `denyOut` and `allow_internet_access` say:
    /// IPv4 addresses, CIDRs, host names, or `*.domain` for its subdomains (at most 1000).
    /// A bad entry is a 400 naming it.
    pub allow_out: Option<Vec<String>>,
    /// Destinations refused unless `allowOut` names them (same syntax; `0.0.0.0/0` with an
    /// `allowOut` list makes an allow-list).
    pub deny_out: Option<Vec<String>>,
}

/// Body of `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TimeoutBody {
    pub timeout: u64,
}

/// Body of the connect and resume calls.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectBody {
    pub timeout: Option<u64>,
}

/// E2B `SandboxState`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum E2bState {
    Running,
    Paused,
}

impl E2bState {
    /// `None` for sandboxes that E2B clients must see as gone.
    pub fn of(state: SandboxState) -> Option<Self> {
        match state {
            SandboxState::Creating | SandboxState::Running => Some(Self::Running),
            SandboxState::Paused => Some(Self::Paused),
            SandboxState::Killed | SandboxState::Lost => None,
        }
    }
}

/// Response of create, connect and resume (E2B `Sandbox`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct E2bSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub alias: Option<String>,
    pub envd_version: String,
    pub envd_access_token: Option<String>,
    pub domain: Option<String>,
    /// Present when the sandbox was created with `network.allowPublicTraffic: false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
}

/// Response of `GET /sandboxes/{id}` (E2B `SandboxDetail`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub alias: Option<String>,
    pub started_at: String,
    pub end_at: String,
    pub envd_version: String,
    pub envd_access_token: Option<String>,
    pub domain: Option<String>,
    pub cpu_count: i64,
    #[serde(rename = "memoryMB")]
    pub memory_mb: i64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: i64,
    pub metadata: BTreeMap<String, String>,
    pub state: E2bState,
}

/// One entry of the list calls (E2B `ListedSandbox`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub alias: Option<String>,
    pub started_at: String,
    pub end_at: String,
    pub cpu_count: i64,
    #[serde(rename = "memoryMB")]
    pub memory_mb: i64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: i64,
    pub metadata: BTreeMap<String, String>,
    pub state: E2bState,
    pub envd_version: String,
}

/// One sample of `GET /sandboxes/{id}/metrics` (E2B `SandboxMetric`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    pub timestamp: String,
    pub timestamp_unix: i64,
    pub cpu_count: i64,
    pub cpu_used_pct: f64,
    pub mem_used: i64,
    pub mem_total: i64,
    pub mem_cache: i64,
    pub disk_used: i64,
    pub disk_total: i64,
}

fn client_id(s: &Sandbox) -> String {
    s.host_id.clone().unwrap_or_else(|| "unplaced".to_owned())
}

pub fn sandbox(s: Sandbox, domain: Option<String>) -> E2bSandbox {
    E2bSandbox {
        client_id: client_id(&s),
        template_id: s.template_id,
        sandbox_id: s.id,
        alias: None,
        envd_version: s.envd_version,
        envd_access_token: s.envd_access_token,
        domain,
        traffic_access_token: s.traffic_access_token,
    }
}

pub fn detail(s: Sandbox, state: E2bState, domain: Option<String>) -> SandboxDetail {
    SandboxDetail {
        client_id: client_id(&s),
        template_id: s.template_id,
        sandbox_id: s.id,
        alias: None,
        started_at: rfc3339(s.started_at),
        end_at: rfc3339(s.end_at),
        envd_version: s.envd_version,
        envd_access_token: s.envd_access_token,
        domain,
        cpu_count: s.cpu_count,
        memory_mb: s.memory_mb,
        disk_size_mb: s.disk_size_mb,
        metadata: s.metadata,
        state,
    }
}

pub fn listed(s: Sandbox, state: E2bState) -> ListedSandbox {
    ListedSandbox {
        client_id: client_id(&s),
        template_id: s.template_id,
        sandbox_id: s.id,
        alias: None,
        started_at: rfc3339(s.started_at),
        end_at: rfc3339(s.end_at),
        cpu_count: s.cpu_count,
        memory_mb: s.memory_mb,
        disk_size_mb: s.disk_size_mb,
        metadata: s.metadata,
        state,
        envd_version: s.envd_version,
    }
}

pub fn metric(m: MetricSample) -> SandboxMetric {
    SandboxMetric {
        timestamp: rfc3339(m.timestamp_ms),
        timestamp_unix: m.timestamp_ms / 1000,
        cpu_count: m.cpu_count,
        cpu_used_pct: m.cpu_used_pct,
        mem_used: m.mem_used,
        mem_total: m.mem_total,
        mem_cache: m.mem_cache,
        disk_used: m.disk_used,
        disk_total: m.disk_total,
    }
}
