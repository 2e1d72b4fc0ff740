//! Reconciliation: making the database and a worker agree on which sandboxes run there.
//!
//! For every sandbox a worker reports (in its hello and in each heartbeat):
//! - unknown to control, killed, or placed on another host → the worker is told to kill it;
//! - `lost` in the database → it is back: `running` or `paused` as reported, on this host;
//! - still `creating` in the database, or `starting` on the worker → left alone (a create is
//!   in flight).
//!
//! It runs in its own task per connection ([`run`]), beside the heartbeat loop.
//!
//! Only on connect (the hello), every sandbox the database places on this host as `running`
//! or `paused` that the worker does *not* report is marked `lost`: the worker restarted
//! without it. This is not done per heartbeat, because a kill or pause in flight makes the two
//! sides briefly disagree. On connect too, placement may use the connection before this task
//! runs: a sandbox created or resumed there after the hello (its `updated_at` is not before
//! the hello's arrival) is not in the hello and must not be marked lost.

use std::collections::HashSet;
use std::sync::Arc;

use roost_proto::control::{Operation, SandboxReport, WorkerSandboxState};

use super::monitor;
use super::rpc;
use super::server::Shared;
use crate::lifecycle::state::{Event, SandboxState, transition};
use crate::store::StoreError;
use crate::store::audit::{self, Actor};
use crate::store::sandboxes::{self, Changes};

/// A connection's reconciler: first the hello's report (with [`on_connect`]), then each
/// heartbeat's latest report (with [`on_reports`]); reports that arrive while one is being
/// handled are superseded by the newest. Ends when the session drops `latest`.
pub async fn run(
    shared: Arc<Shared>,
    host_id: String,
    hello: Vec<SandboxReport>,
    hello_at: i64,
    mut latest: tokio::sync::watch::Receiver<Option<Vec<SandboxReport>>>,
) {
    if let Err(e) = on_connect(&shared, &host_id, &hello, hello_at).await {
        tracing::error!(host = %host_id, error = %e, "reconciliation on connect failed");
    }
    while latest.changed().await.is_ok() {
        let Some(reports) = latest.borrow_and_update().clone() else {
            continue;
        };
        if let Err(e) = on_reports(&shared, &host_id, &reports).await {
            tracing::error!(host = %host_id, error = %e, "reconciling a heartbeat failed");
        }
    }
}

/// What reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub kill_orders: usize,
    pub reappeared: usize,
    pub lost: usize,
}

/// Reconciles a fresh connection's hello, which arrived at `hello_at` (Unix ms).
pub async fn on_connect(
    shared: &Arc<Shared>,
    host_id: &str,
    reports: &[SandboxReport],
    hello_at: i64,
) -> Result<Outcome, StoreError> {
    let mut outcome = on_reports(shared, host_id, reports).await?;
    let reported: HashSet<&str> = reports.iter().map(|r| r.sandbox_id.as_str()).collect();
    let placed = sandboxes::on_host(
        &shared.db,
        host_id,
        &[SandboxState::Running, SandboxState::Paused],
    )
    .await?;
    for sandbox in placed {
        if !reported.contains(sandbox.id.as_str())
            && sandbox.updated_at < hello_at
            && monitor::mark_lost(shared, &sandbox, "not reported by its worker on reconnect")
                .await?
        {
            outcome.lost += 1;
        }
    }
    if outcome != Outcome::default() {
        tracing::info!(host = host_id, ?outcome, "reconciled worker on connect");
    }
    Ok(outcome)
}

/// Reconciles the sandboxes a hello or heartbeat reports.
pub async fn on_reports(
    shared: &Arc<Shared>,
    host_id: &str,
    reports: &[SandboxReport],
) -> Result<Outcome, StoreError> {
    let mut outcome = Outcome::default();
    let ids: Vec<&str> = reports
        .iter()
        .filter(|r| r.state != WorkerSandboxState::Starting)
        .map(|r| r.sandbox_id.as_str())
        .collect();
    let stored_all = sandboxes::get_many_any_team(&shared.db, &ids).await?;
    for report in reports {
        let reported = match report.state {
            WorkerSandboxState::Starting => continue,
            WorkerSandboxState::Running => Event::Reappeared,
            WorkerSandboxState::Paused => Event::ReappearedPaused,
        };
        let stored = stored_all.get(&report.sandbox_id).cloned();
        let orphan = match &stored {
            None => true,
            Some(s) if s.state == SandboxState::Creating => false,
            Some(s) => s.state == SandboxState::Killed || s.host_id.as_deref() != Some(host_id),
        };
        if orphan {
            order_kill(shared, host_id, &report.sandbox_id, stored.as_ref()).await?;
            outcome.kill_orders += 1;
            continue;
        }
        let Some(sandbox) = stored.filter(|s| s.state == SandboxState::Lost) else {
            continue;
        };
        let Ok(to) = transition(sandbox.state, reported) else {
            continue;
        };
        let changes = Changes {
            host_id: Some(host_id.to_owned()),
            ..Changes::default()
        };
        if sandboxes::compare_and_set(&shared.db, None, &sandbox.id, sandbox.state, to, changes)
            .await?
        {
            outcome.reappeared += 1;
            audit::record(
                shared.db.pool(),
                audit::Event {
                    team_id: Some(&sandbox.team_id),
                    actor: &Actor::System,
                    action: "sandbox.reappeared",
                    target_kind: "sandbox",
                    target_id: Some(&sandbox.id),
                    details: serde_json::json!({ "host": host_id, "state": to }),
                },
            )
            .await?;
        }
    }
    Ok(outcome)
}

/// Tells the worker to kill a sandbox control does not want there, in the background (the
/// heartbeat loop must not wait for it), and audits the order. While an order for the same
/// sandbox is in flight, later heartbeats that still report it add nothing.
async fn order_kill(
    shared: &Arc<Shared>,
    host_id: &str,
    sandbox_id: &str,
    stored: Option<&sandboxes::Sandbox>,
) -> Result<(), StoreError> {
    let Some(connection) = shared.registry.connection(host_id) else {
        return Ok(());
    };
    if !shared.kills_in_flight.begin(sandbox_id) {
        return Ok(());
    }
    tracing::info!(
        host = host_id,
        sandbox = sandbox_id,
        "worker holds a sandbox control does not; killing it"
    );
    let recorded = audit::record(
        shared.db.pool(),
        audit::Event {
            team_id: stored.map(|s| s.team_id.as_str()),
            actor: &Actor::System,
            action: "sandbox.reconcile_kill",
            target_kind: "sandbox",
            target_id: Some(sandbox_id),
            details: serde_json::json!({
                "host": host_id,
                "stored_state": stored.map(|s| s.state),
                "stored_host": stored.and_then(|s| s.host_id.clone()),
            }),
        },
    )
    .await;
    if let Err(e) = recorded {
        shared.kills_in_flight.end(sandbox_id);
        return Err(e);
    }
    let request_id = shared.registry.next_request_id();
    let operation = Operation::Kill {
        sandbox_id: sandbox_id.to_owned(),
    };
    let timeout = shared.config.request_timeout;
    let (host, sandbox) = (host_id.to_owned(), sandbox_id.to_owned());
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Err(e) = rpc::call(&connection, request_id, operation, timeout).await {
            tracing::warn!(%host, %sandbox, error = %e, "reconciliation kill failed");
        }
        shared.kills_in_flight.end(&sandbox);
    });
    Ok(())
}
