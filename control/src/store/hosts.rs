//! Hosts (workers). Today only placements that run in-process register one; the worker
//! channel will register, heartbeat and mark hosts lost through the same table.

use super::{Db, StoreError, now_ms};

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
