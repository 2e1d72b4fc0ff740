//! Placement: choosing a host for a sandbox and telling that host's worker what to do.
//!
//! The REST layer and the reaper only see the [`Placement`] trait. Two implementations:
//! [`instant::InstantWorker`], an in-process worker that answers at once (tests and
//! control-only benchmarks), and [`quic::QuicPlacement`], real workers over the QUIC control
//! channel, chosen by capacity and template.

pub mod instant;
pub mod quic;

use std::collections::BTreeMap;

use async_trait::async_trait;
use roost_proto::SandboxId;

/// What a worker needs to start (or restore) a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: SandboxId,
    pub team_id: String,
    pub template_id: String,
    pub cpu_count: i64,
    pub memory_mb: i64,
    pub disk_size_mb: i64,
    /// Environment variables for the guest; only their names are ever stored.
    pub env_vars: BTreeMap<String, String>,
    pub envd_access_token: Option<String>,
    pub allow_internet: bool,
    /// E2B `network.allowOut` / `network.denyOut`, validated, as the user wrote them.
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
}

/// Where a sandbox ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub host_id: String,
}

/// One resource-usage sample of a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    pub timestamp_ms: i64,
    pub cpu_count: i64,
    pub cpu_used_pct: f64,
    pub mem_used: i64,
    pub mem_total: i64,
    pub mem_cache: i64,
    pub disk_used: i64,
    pub disk_total: i64,
}

/// Why a worker request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Hosts offer the template but none has room: waiting may help.
    #[error("no host has capacity for template {template}")]
    NoCapacity { template: String },
    /// No connected host offers the template at all.
    #[error("no connected host offers template {template}")]
    NoTemplateHost { template: String },
    #[error("host {host} is not connected")]
    HostUnavailable { host: String },
    #[error("host {host} did not answer in time")]
    Timeout { host: String },
    #[error("host {host} does not know sandbox {sandbox}")]
    UnknownSandbox { host: String, sandbox: String },
    #[error("worker refused: {reason}")]
    Refused { reason: String },
}

/// Runs sandboxes on workers. Every method returns once the worker has done the work.
#[async_trait]
pub trait Placement: Send + Sync + std::fmt::Debug {
    /// Starts a new sandbox on a host of the implementation's choosing.
    async fn create(&self, spec: &SandboxSpec) -> Result<Placed, PlacementError>;
    async fn kill(&self, host_id: &str, id: &SandboxId) -> Result<(), PlacementError>;
    async fn pause(&self, host_id: &str, id: &SandboxId) -> Result<(), PlacementError>;
    /// Restores a paused sandbox; `host_id` is the host that holds its snapshot.
    async fn resume(&self, host_id: &str, spec: &SandboxSpec) -> Result<Placed, PlacementError>;
    async fn metrics(
        &self,
        host_id: &str,
        id: &SandboxId,
    ) -> Result<Vec<MetricSample>, PlacementError>;
    /// Saves running sandbox `id` as template `snapshot_id` on its host, which from then on
    /// offers that template. Returns the snapshot's size in bytes.
    async fn snapshot(
        &self,
        host_id: &str,
        id: &SandboxId,
        snapshot_id: &str,
    ) -> Result<u64, PlacementError>;
    /// Makes a change of `host_id`'s drain flag (already stored) effective at once in this
    /// instance's placement; other instances pick it up from the database with the host's
    /// next heartbeat. Placements without a choice of hosts ignore it.
    fn set_draining(&self, _host_id: &str, _draining: bool) {}
    /// Removes template `template_id` (a snapshot) from the host holding it.
    async fn delete_template(&self, host_id: &str, template_id: &str)
    -> Result<(), PlacementError>;
}
