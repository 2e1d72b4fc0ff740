//! The reaper: enforces sandbox timeouts and forgets stale idempotency keys.
//!
//! A running sandbox whose `end_at` has passed is paused when it asked for `auto_pause`, and
//! killed otherwise. If the worker cannot pause it, it is killed: a timeout must always end the
//! sandbox's use of the host. Each pass handles a bounded batch, so one slow pass cannot grow
//! without bound; the next tick picks up the rest.

use std::time::Duration;

use roost_proto::SandboxId;

use super::service::Sandboxes;
use super::state::{Event, SandboxState, transition};
use crate::store::audit::{self, Actor};
use crate::store::sandboxes::{self, Changes, Sandbox};
use crate::store::{StoreError, idempotency};

/// Sandboxes handled per pass.
pub const BATCH: i64 = 256;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub paused: usize,
    pub killed: usize,
    pub idempotency_keys_purged: u64,
}

/// One pass at time `now` (Unix ms).
pub async fn reap_once(sandboxes: &Sandboxes, now: i64) -> Result<Report, StoreError> {
    let mut report = Report::default();
    for sandbox in sandboxes::expired(sandboxes.db(), now, BATCH).await? {
        match expire(sandboxes, &sandbox).await? {
            Some(SandboxState::Paused) => report.paused += 1,
            Some(_) => report.killed += 1,
            None => {}
        }
    }
    report.idempotency_keys_purged = idempotency::purge(sandboxes.db(), now).await?;
    if report != Report::default() {
        tracing::info!(?report, "reaper pass");
    }
    Ok(report)
}

/// Ends one expired sandbox; returns its new state, or `None` if someone else moved it first.
async fn expire(
    sandboxes: &Sandboxes,
    sandbox: &Sandbox,
) -> Result<Option<SandboxState>, StoreError> {
    let Ok(id) = sandbox.id.parse::<SandboxId>() else {
        tracing::error!(sandbox = %sandbox.id, "stored sandbox id is malformed; skipping");
        return Ok(None);
    };
    let host = sandbox.host_id.as_deref().unwrap_or_default();
    let placement = sandboxes.placement();
    let mut event = Event::TimedOut {
        auto_pause: sandbox.auto_pause,
    };
    if sandbox.auto_pause
        && let Err(e) = placement.pause(host, &id).await
    {
        tracing::warn!(sandbox = %sandbox.id, error = %e, "auto-pause failed; killing instead");
        event = Event::TimedOut { auto_pause: false };
    }
    if event == (Event::TimedOut { auto_pause: false })
        && let Err(e) = placement.kill(host, &id).await
    {
        tracing::warn!(sandbox = %sandbox.id, error = %e, "worker could not kill timed-out sandbox");
    }
    let Ok(to) = transition(sandbox.state, event) else {
        return Ok(None);
    };
    let moved = sandboxes::compare_and_set(
        sandboxes.db(),
        None,
        &sandbox.id,
        sandbox.state,
        to,
        Changes::default(),
    )
    .await?;
    if !moved {
        return Ok(None);
    }
    let action = if to == SandboxState::Paused {
        "sandbox.auto_pause"
    } else {
        "sandbox.timeout_kill"
    };
    audit::record(
        sandboxes.db().pool(),
        audit::Event {
            team_id: Some(&sandbox.team_id),
            actor: &Actor::System,
            action,
            target_kind: "sandbox",
            target_id: Some(&sandbox.id),
            details: serde_json::json!({ "end_at": sandbox.end_at }),
        },
    )
    .await?;
    Ok(Some(to))
}

/// Runs [`reap_once`] every `interval` until the task is aborted.
pub fn spawn(sandboxes: Sandboxes, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = reap_once(&sandboxes, crate::store::now_ms()).await {
                tracing::error!(error = %e, "reaper pass failed");
            }
        }
    })
}
