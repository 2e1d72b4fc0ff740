//! Hosts (workers). In-process placements register one with [`upsert_ready`]; real workers
//! register with a one-time token ([`register`]), connect over the control channel
//! ([`mark_connected`]), heartbeat ([`heartbeat`]) and are marked lost by the monitor when
//! their heartbeats stop ([`stale`], [`mark_lost`]).
//!
//! `state` is `ready` while a worker is connected and heartbeating, `lost` while it is not
//! (including a registered worker that has not connected yet). Draining is a separate flag
//! ([`set_draining`]), not a state, so that a draining host that drops out and comes back is
//! still draining. (The schema's `draining` state value is unused.)

use super::{Db, StoreError, now_ms};

/// A stored host.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Host {
    pub id: String,
    pub name: String,
    pub state: String,
    pub cpu_count: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub max_sandboxes: i64,
    /// JSON array of template ids.
    pub templates: String,
    pub worker_version: Option<String>,
    pub cert_sha256: Option<String>,
    pub last_heartbeat_at: Option<i64>,
    pub created_at: i64,
    /// 1 while an operator keeps new sandboxes off the host.
    pub draining: i64,
    /// The certificate replaced by the last renewal, still accepted until it expires.
    pub previous_cert_sha256: Option<String>,
}

const COLUMNS: &str = "id, name, state, cpu_count, memory_mb, disk_mb, max_sandboxes, templates, \
    worker_version, cert_sha256, last_heartbeat_at, created_at, draining, previous_cert_sha256";

/// What a worker reported about itself when it connected.
#[derive(Debug, Clone)]
pub struct Reported<'a> {
    pub cpu_count: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub max_sandboxes: i64,
    pub templates: &'a [String],
    pub worker_version: &'a str,
}

/// Inserts or refreshes a host that is ready to take sandboxes.
pub async fn upsert_ready(
    db: &Db,
    id: &str,
    name: &str,
    cpu_count: i64,
    memory_mb: i64,
) -> Result<(), StoreError> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO hosts (id, name, state, cpu_count, memory_mb, last_heartbeat_at, created_at) \
         VALUES ($1, $2, 'ready', $3, $4, $5, $5) \
         ON CONFLICT (id) DO UPDATE SET name = $2, state = 'ready', cpu_count = $3, \
         memory_mb = $4, last_heartbeat_at = $5",
    )
    .bind(id)
    .bind(name)
    .bind(cpu_count)
    .bind(memory_mb)
    .bind(now)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Records a newly registered worker host, not yet connected, identified by the SHA-256 of
/// the certificate issued to it.
pub async fn register(db: &Db, id: &str, name: &str, cert_sha256: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO hosts (id, name, state, cpu_count, memory_mb, cert_sha256, created_at) \
         VALUES ($1, $2, 'lost', 0, 0, $3, $4)",
    )
    .bind(id)
    .bind(name)
    .bind(cert_sha256)
    .bind(now_ms())
    .execute(db.pool())
    .await?;
    Ok(())
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Host>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM hosts WHERE id = $1");
    Ok(sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(db.pool())
        .await?)
}

/// The host holding the certificate whose DER encoding hashes to `cert_sha256`: its current
/// one or the one its last renewal replaced (TLS has already checked that it has not expired).
pub async fn by_cert(db: &Db, cert_sha256: &str) -> Result<Option<Host>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM hosts WHERE cert_sha256 = $1 OR previous_cert_sha256 = $1 \
         ORDER BY id LIMIT 1"
    );
    Ok(sqlx::query_as(&sql)
        .bind(cert_sha256)
        .fetch_optional(db.pool())
        .await?)
}

/// Every host, oldest first.
pub async fn list(db: &Db) -> Result<Vec<Host>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM hosts ORDER BY created_at, id");
    Ok(sqlx::query_as(&sql).fetch_all(db.pool()).await?)
}

/// Marks a worker host connected (`ready`) with what its hello reported.
pub async fn mark_connected(db: &Db, id: &str, r: &Reported<'_>) -> Result<(), StoreError> {
    let templates = serde_json::to_string(r.templates).map_err(|e| StoreError::Corrupt {
        column: "hosts.templates",
        source: Box::new(e),
    })?;
    sqlx::query(
        "UPDATE hosts SET state = 'ready', cpu_count = $1, memory_mb = $2, disk_mb = $3, \
         max_sandboxes = $4, templates = $5, worker_version = $6, last_heartbeat_at = $7 \
         WHERE id = $8",
    )
    .bind(r.cpu_count)
    .bind(r.memory_mb)
    .bind(r.disk_mb)
    .bind(r.max_sandboxes)
    .bind(templates)
    .bind(r.worker_version)
    .bind(now_ms())
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Records a heartbeat at `now` and returns the host's drain flag. `None` when the host is no
/// longer `ready` (the monitor marked it lost meanwhile): the worker must then reconnect and
/// be reconciled.
pub async fn heartbeat(db: &Db, id: &str, now: i64) -> Result<Option<bool>, StoreError> {
    let row: Option<(i64,)> = sqlx::query_as(
        "UPDATE hosts SET last_heartbeat_at = $1 WHERE id = $2 AND state = 'ready' \
         RETURNING draining",
    )
    .bind(now)
    .bind(id)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(d,)| d != 0))
}

/// Sets host `id`'s drain flag; returns whether the host exists.
pub async fn set_draining(db: &Db, id: &str, draining: bool) -> Result<bool, StoreError> {
    let res = sqlx::query("UPDATE hosts SET draining = $1 WHERE id = $2")
        .bind(i64::from(draining))
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(res.rows_affected() == 1)
}

/// Replaces host `id`'s certificate `current` by `renewed`, keeping `current` as the previous
/// one (dropping any older previous one). A compare-and-set on `current`, so two concurrent
/// renewals cannot both win; returns whether it applied.
pub async fn renew_cert(
    db: &Db,
    id: &str,
    current: &str,
    renewed: &str,
) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "UPDATE hosts SET previous_cert_sha256 = cert_sha256, cert_sha256 = $1 \
         WHERE id = $2 AND cert_sha256 = $3",
    )
    .bind(renewed)
    .bind(id)
    .bind(current)
    .execute(db.pool())
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Registered worker hosts still `ready` whose last heartbeat is older than `before`.
/// In-process hosts (no certificate) never heartbeat and are never stale.
pub async fn stale(db: &Db, before: i64) -> Result<Vec<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM hosts WHERE state = 'ready' AND cert_sha256 IS NOT NULL \
         AND last_heartbeat_at < $1 ORDER BY id",
    )
    .bind(before)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Moves host `id` from `ready` to `lost` if its last heartbeat is still older than `before`
/// (a compare-and-set, so a heartbeat that lands meanwhile wins). Returns whether it moved.
pub async fn mark_lost(db: &Db, id: &str, before: i64) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "UPDATE hosts SET state = 'lost' WHERE id = $1 AND state = 'ready' \
         AND last_heartbeat_at < $2",
    )
    .bind(id)
    .bind(before)
    .execute(db.pool())
    .await?;
    Ok(res.rows_affected() == 1)
}
