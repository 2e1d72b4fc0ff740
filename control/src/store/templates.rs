//! The template catalog. A template with no team is public; otherwise only its team sees it.
//! Templates are addressed by id or alias, as the E2B SDKs do (`base`, `code-interpreter-v1`).

use super::{Db, StoreError};

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
}

const COLUMNS: &str =
    "id, team_id, alias, cpu_count, memory_mb, disk_size_mb, envd_version, created_at";

/// The template named `id_or_alias` if `team_id` may use it.
pub async fn visible(
    db: &Db,
    team_id: &str,
    id_or_alias: &str,
) -> Result<Option<Template>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM templates WHERE (id = $1 OR alias = $1) \
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
