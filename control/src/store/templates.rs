//! The template catalog. A template with no team is public; otherwise only its team sees it.
//! Templates are addressed by id or alias, as the E2B SDKs do (`base`, `code-interpreter-v1`),
//! and a team's snapshots also by their team-scoped name.
//!
//! A snapshot (`kind = 'snapshot'`) is a team template made from one of its sandboxes. It lives
//! on the host that took it (`host_id`): only that worker can start sandboxes from it, which
//! the worker says by listing it among its templates.

use super::sandboxes::After;
use super::{Db, StoreError};

/// `kind` of a template built by the image pipeline.
pub const KIND_TEMPLATE: &str = "template";
/// `kind` of a snapshot of a sandbox.
pub const KIND_SNAPSHOT: &str = "snapshot";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Template {
    pub id: String,
    pub team_id: Option<String>,
    pub alias: Option<String>,
    pub cpu_count: i64,
    pub memory_mb: i64,
    pub disk_size_mb: i64,
    pub envd_version: String,
    pub created_at: i64,
    /// [`KIND_TEMPLATE`] or [`KIND_SNAPSHOT`].
    pub kind: String,
    /// A snapshot's team-scoped name.
    pub name: Option<String>,
    pub source_sandbox_id: Option<String>,
    /// The host holding a snapshot's files.
    pub host_id: Option<String>,
    pub size_bytes: Option<i64>,
}

const COLUMNS: &str = "id, team_id, alias, cpu_count, memory_mb, disk_size_mb, envd_version, \
    created_at, kind, name, source_sandbox_id, host_id, size_bytes";

/// The template named `id_or_alias` (or a snapshot's name) if `team_id` may use it.
pub async fn visible(
    db: &Db,
    team_id: &str,
    id_or_alias: &str,
) -> Result<Option<Template>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM templates WHERE (id = $1 OR alias = $1 OR name = $1) \
         AND (team_id IS NULL OR team_id = $2) ORDER BY id LIMIT 1"
    );
    Ok(sqlx::query_as(&sql)
        .bind(id_or_alias)
        .bind(team_id)
        .fetch_optional(db.pool())
        .await?)
}

/// Every template `team_id` may use: the public ones and its own.
pub async fn list_visible(db: &Db, team_id: &str) -> Result<Vec<Template>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM templates WHERE team_id IS NULL OR team_id = $1 ORDER BY id"
    );
    Ok(sqlx::query_as(&sql)
        .bind(team_id)
        .fetch_all(db.pool())
        .await?)
}

/// Records a new snapshot. If `t.name` is taken in the team, the new snapshot takes the name
/// over (the older one keeps its id), as E2B does when a name is reused.
pub async fn insert_snapshot(db: &Db, t: &Template) -> Result<(), StoreError> {
    let mut tx = db.pool().begin().await?;
    if let (Some(team), Some(name)) = (&t.team_id, &t.name) {
        sqlx::query("UPDATE templates SET name = NULL WHERE team_id = $1 AND name = $2")
            .bind(team)
            .bind(name)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "INSERT INTO templates (id, team_id, alias, cpu_count, memory_mb, disk_size_mb, \
         envd_version, created_at, kind, name, source_sandbox_id, host_id, size_bytes) \
         VALUES ($1, $2, NULL, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&t.id)
    .bind(&t.team_id)
    .bind(t.cpu_count)
    .bind(t.memory_mb)
    .bind(t.disk_size_mb)
    .bind(&t.envd_version)
    .bind(t.created_at)
    .bind(KIND_SNAPSHOT)
    .bind(&t.name)
    .bind(&t.source_sandbox_id)
    .bind(&t.host_id)
    .bind(t.size_bytes)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A page of `team_id`'s snapshots, newest first (optionally only those of one sandbox), and
/// whether more follow.
pub async fn list_snapshots(
    db: &Db,
    team_id: &str,
    sandbox_id: Option<&str>,
    after: Option<&After>,
    limit: u32,
) -> Result<(Vec<Template>, bool), StoreError> {
    let (after_ts, after_id) =
        after.map_or((i64::MAX, String::new()), |a| (a.created_at, a.id.clone()));
    // `$4 = ''` means no cursor; `$3 = ''` no sandbox filter (both bound as text, so the
    // query stays one static string on both engines).
    let sql = format!(
        "SELECT {COLUMNS} FROM templates WHERE team_id = $1 AND kind = $2 \
         AND ($3 = '' OR source_sandbox_id = $3) \
         AND ($4 = '' OR created_at < $5 OR (created_at = $5 AND id < $4)) \
         ORDER BY created_at DESC, id DESC LIMIT $6"
    );
    let mut rows: Vec<Template> = sqlx::query_as(&sql)
        .bind(team_id)
        .bind(KIND_SNAPSHOT)
        .bind(sandbox_id.unwrap_or(""))
        .bind(after_id)
        .bind(after_ts)
        .bind(i64::from(limit) + 1)
        .fetch_all(db.pool())
        .await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok((rows, more))
}

/// `team_id`'s own template (not a public one) named `id_or_name`.
pub async fn owned(
    db: &Db,
    team_id: &str,
    id_or_name: &str,
) -> Result<Option<Template>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM templates WHERE team_id = $1 AND (id = $2 OR name = $2) \
         ORDER BY id LIMIT 1"
    );
    Ok(sqlx::query_as(&sql)
        .bind(team_id)
        .bind(id_or_name)
        .fetch_optional(db.pool())
        .await?)
}

/// Deletes `team_id`'s template `id`; returns whether it existed.
pub async fn delete(db: &Db, team_id: &str, id: &str) -> Result<bool, StoreError> {
    let res = sqlx::query("DELETE FROM templates WHERE team_id = $1 AND id = $2")
        .bind(team_id)
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(res.rows_affected() == 1)
}
