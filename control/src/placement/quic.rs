//! Placement on real workers over the QUIC control channel.
//!
//! A create goes to the connected worker with the most headroom that offers the template
//! ([`Registry::reserve_best`]); if that worker answers `no_capacity` or `unknown_template`
//! (its heartbeat was stale) or its connection fails before answering, the next one is tried.
//! A timeout is not retried elsewhere: the worker may still start the sandbox, and a second
//! copy would have to be reconciled away. Every other operation goes to the sandbox's host.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use roost_proto::SandboxId;
use roost_proto::control::{CreateSandbox, Operation, Outcome};

use super::{MetricSample, Placed, Placement, PlacementError, SandboxSpec};
use crate::workers::Registry;
use crate::workers::registry::Need;
use crate::workers::rpc::{self, CallError};

/// [`Placement`] over connected workers.
#[derive(Debug, Clone)]
pub struct QuicPlacement {
    registry: Arc<Registry>,
    timeout: Duration,
}

fn need_of(spec: &SandboxSpec) -> Need {
    Need {
        vcpus: u32::try_from(spec.cpu_count).unwrap_or(u32::MAX),
        memory_mib: u64::try_from(spec.memory_mb).unwrap_or(u64::MAX),
        disk_mib: u64::try_from(spec.disk_size_mb).unwrap_or(u64::MAX),
    }
}

fn wire_spec(spec: &SandboxSpec) -> CreateSandbox {
    let need = need_of(spec);
    CreateSandbox {
        sandbox_id: spec.id.as_str().to_owned(),
        team_id: spec.team_id.clone(),
        template_id: spec.template_id.clone(),
        vcpus: need.vcpus,
        memory_mib: need.memory_mib,
        disk_mib: need.disk_mib,
        env_vars: spec.env_vars.clone(),
        envd_access_token: spec.envd_access_token.clone(),
        allow_internet: spec.allow_internet,
        allow_out: spec.allow_out.clone(),
        deny_out: spec.deny_out.clone(),
    }
}

impl QuicPlacement {
    pub fn new(registry: Arc<Registry>, timeout: Duration) -> Self {
        Self { registry, timeout }
    }

    async fn call(
        &self,
        host_id: &str,
        operation: Operation,
        sandbox: &str,
        template: &str,
    ) -> Result<Outcome, PlacementError> {
        let connection =
            self.registry
                .connection(host_id)
                .ok_or_else(|| PlacementError::HostUnavailable {
                    host: host_id.to_owned(),
                })?;
        rpc::call(
            &connection,
            self.registry.next_request_id(),
            operation,
            self.timeout,
        )
        .await
        .map_err(|e| e.into_placement(host_id, sandbox, template))
    }
}

fn unexpected(outcome: &Outcome) -> PlacementError {
    PlacementError::Refused {
        reason: format!("unexpected answer {outcome:?}"),
    }
}

#[async_trait]
impl Placement for QuicPlacement {
    async fn create(&self, spec: &SandboxSpec) -> Result<Placed, PlacementError> {
        let need = need_of(spec);
        let mut tried: Vec<String> = Vec::new();
        let mut last_refusal = None;
        loop {
            let candidate = match self.registry.reserve_best(&spec.template_id, need, &tried) {
                Ok(c) => c,
                // Report the most telling failure: a worker's own refusal over "none left".
                Err(none_left) => return Err(last_refusal.unwrap_or(none_left)),
            };
            let request_id = self.registry.next_request_id();
            let operation = Operation::Create(wire_spec(spec));
            let result =
                rpc::call(&candidate.connection, request_id, operation, self.timeout).await;
            let error = match result {
                Ok(Outcome::Created) => {
                    return Ok(Placed {
                        host_id: candidate.host_id,
                    });
                }
                Ok(other) => CallError::UnexpectedOutcome(other),
                Err(e) => e,
            };
            self.registry.release(&candidate.host_id, need);
            let error =
                error.into_placement(&candidate.host_id, spec.id.as_str(), &spec.template_id);
            tracing::info!(host = %candidate.host_id, sandbox = %spec.id, error = %error, "create refused");
            match error {
                PlacementError::NoCapacity { .. }
                | PlacementError::NoTemplateHost { .. }
                | PlacementError::HostUnavailable { .. } => {
                    tried.push(candidate.host_id);
                    last_refusal = Some(error);
                }
                other => return Err(other),
            }
        }
    }

    async fn kill(&self, host_id: &str, id: &SandboxId) -> Result<(), PlacementError> {
        let op = Operation::Kill {
            sandbox_id: id.as_str().to_owned(),
        };
        match self.call(host_id, op, id.as_str(), "").await? {
            Outcome::Killed => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn pause(&self, host_id: &str, id: &SandboxId) -> Result<(), PlacementError> {
        let op = Operation::Pause {
            sandbox_id: id.as_str().to_owned(),
        };
        match self.call(host_id, op, id.as_str(), "").await? {
            Outcome::Paused => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn resume(&self, host_id: &str, spec: &SandboxSpec) -> Result<Placed, PlacementError> {
        let op = Operation::Resume(wire_spec(spec));
        match self
            .call(host_id, op, spec.id.as_str(), &spec.template_id)
            .await?
        {
            Outcome::Resumed => Ok(Placed {
                host_id: host_id.to_owned(),
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn metrics(
        &self,
        host_id: &str,
        id: &SandboxId,
    ) -> Result<Vec<MetricSample>, PlacementError> {
        let op = Operation::Metrics {
            sandbox_id: id.as_str().to_owned(),
        };
        match self.call(host_id, op, id.as_str(), "").await? {
            Outcome::Metrics { samples } => Ok(samples
                .into_iter()
                .map(|s| MetricSample {
                    timestamp_ms: s.timestamp_ms,
                    cpu_count: i64::from(s.cpu_count),
                    cpu_used_pct: s.cpu_used_pct,
                    mem_used: i64::try_from(s.mem_used).unwrap_or(i64::MAX),
                    mem_total: i64::try_from(s.mem_total).unwrap_or(i64::MAX),
                    mem_cache: i64::try_from(s.mem_cache).unwrap_or(i64::MAX),
                    disk_used: i64::try_from(s.disk_used).unwrap_or(i64::MAX),
                    disk_total: i64::try_from(s.disk_total).unwrap_or(i64::MAX),
                })
                .collect()),
            other => Err(unexpected(&other)),
        }
    }

    async fn snapshot(
        &self,
        host_id: &str,
        id: &SandboxId,
        snapshot_id: &str,
    ) -> Result<u64, PlacementError> {
        let op = Operation::Snapshot {
            sandbox_id: id.as_str().to_owned(),
            snapshot_id: snapshot_id.to_owned(),
        };
        match self.call(host_id, op, id.as_str(), snapshot_id).await? {
            Outcome::Snapshotted { size_bytes } => {
                // Placeable at once, before the worker's next heartbeat lists it.
                self.registry.offer(host_id, snapshot_id);
                Ok(size_bytes)
            }
            other => Err(unexpected(&other)),
        }
    }

    fn set_draining(&self, host_id: &str, draining: bool) {
        self.registry.set_draining(host_id, draining);
    }

    async fn delete_template(
        &self,
        host_id: &str,
        template_id: &str,
    ) -> Result<(), PlacementError> {
        self.registry.withdraw(host_id, template_id);
        let op = Operation::DeleteTemplate {
            template_id: template_id.to_owned(),
        };
        match self.call(host_id, op, "", template_id).await? {
            Outcome::TemplateDeleted => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}
