//! Lost hosts: a host whose last heartbeat is older than `lost_after` is marked `lost`, its
//! connection (if any) closed, and each of its creating, running or paused sandboxes marked
//! `lost`, each with an audit entry by the system. Works from the database alone, so it also
//! catches hosts that were connected to a control instance that has since stopped.

use std::sync::Arc;
use std::time::Duration;

use super::millis;
use super::server::Shared;
use crate::lifecycle::state::{Event, SandboxState, transition};
use crate::store::audit::{self, Actor};
use crate::store::sandboxes::{self, Changes};
use crate::store::{StoreError, hosts};

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sweep {
    pub hosts_lost: usize,
    pub sandboxes_lost: usize,
}

/// One sweep at `now` (Unix ms).
pub async fn sweep(shared: &Shared, now: i64) -> Result<Sweep, StoreError> {
    let before = now.saturating_sub(millis(shared.config.lost_after));
    let mut report = Sweep::default();
    for host_id in hosts::stale(&shared.db, before).await? {
        if !hosts::mark_lost(&shared.db, &host_id, before).await? {
            continue;
        }
        report.hosts_lost += 1;
        if let Some(connection) = shared.registry.evict(&host_id) {
            connection.close(
                quinn::VarInt::from_u32(2),
                b"heartbeats missed; marked lost",
            );
        }
        tracing::warn!(host = %host_id, "host missed its heartbeats; marked lost");
        audit::record(
            shared.db.pool(),
            audit::Event {
                team_id: None,
                actor: &Actor::System,
                action: "host.lost",
                target_kind: "host",
                target_id: Some(&host_id),
                details: serde_json::json!({ "last_heartbeat_before": before }),
            },
        )
        .await?;
        report.sandboxes_lost += mark_sandboxes_lost(shared, &host_id, "host lost").await?;
    }
    Ok(report)
}

/// Marks every live sandbox on `host_id` lost; returns how many moved.
pub async fn mark_sandboxes_lost(
    shared: &Shared,
    host_id: &str,
    reason: &str,
) -> Result<usize, StoreError> {
    let live = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
    ];
    let mut moved = 0;
    for sandbox in sandboxes::on_host(&shared.db, host_id, &live).await? {
        if mark_lost(shared, &sandbox, reason).await? {
            moved += 1;
        }
    }
    Ok(moved)
}

/// Marks one sandbox lost (compare-and-set on its current state) and audits it.
pub async fn mark_lost(
    shared: &Shared,
    sandbox: &sandboxes::Sandbox,
    reason: &str,
) -> Result<bool, StoreError> {
    let Ok(to) = transition(sandbox.state, Event::HostLost) else {
        return Ok(false);
    };
    let moved = sandboxes::compare_and_set(
        &shared.db,
        None,
        &sandbox.id,
        sandbox.state,
        to,
        Changes::default(),
    )
    .await?;
    if moved {
        audit::record(
            shared.db.pool(),
            audit::Event {
                team_id: Some(&sandbox.team_id),
                actor: &Actor::System,
                action: "sandbox.lost",
                target_kind: "sandbox",
                target_id: Some(&sandbox.id),
                details: serde_json::json!({
                    "host": sandbox.host_id,
                    "was": sandbox.state,
                    "reason": reason,
                }),
            },
        )
        .await?;
    }
    Ok(moved)
}

/// Runs [`sweep`] every `interval` until the task is aborted.
pub fn spawn(shared: Arc<Shared>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match sweep(&shared, crate::store::now_ms()).await {
                Ok(report) if report != Sweep::default() => {
                    tracing::info!(?report, "lost-host sweep");
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "lost-host sweep failed"),
            }
        }
    })
}
