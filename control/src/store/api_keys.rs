//! API keys: only the SHA-256 of the secret and a short display prefix are stored.

use super::{Db, StoreError, now_ms, random_id};

/// A stored API key (never the secret itself).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKey {
    pub id: String,
    pub team_id: String,
    pub created_by: Option<String>,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

const COLUMNS: &str = "id, team_id, created_by, name, prefix, created_at, last_used_at, revoked_at";

pub async fn insert(
    db: &Db,
    team_id: &str,
    created_by: &str,
    name: &str,
    prefix: &str,
    secret_sha256: &str,
) -> Result<ApiKey, StoreError> {
    let id = random_id("key_", 12)?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO api_keys (id, team_id, created_by, name, prefix, secret_sha256, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(team_id)
    .bind(created_by)
    .bind(name)
    .bind(prefix)
    .bind(secret_sha256)
    .bind(now)
    .execute(db.pool())
    .await?;
    Ok(ApiKey {
        id,
        team_id: team_id.to_owned(),
        created_by: Some(created_by.to_owned()),
        name: name.to_owned(),
        prefix: prefix.to_owned(),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    })
}

/// The live (not revoked) key whose secret hashes to `secret_sha256`.
pub async fn active_by_hash(db: &Db, secret_sha256: &str) -> Result<Option<ApiKey>, StoreError> {
    let sql =
        format!("SELECT {COLUMNS} FROM api_keys WHERE secret_sha256 = $1 AND revoked_at IS NULL");
    Ok(sqlx::query_as(&sql)
        .bind(secret_sha256)
        .fetch_optional(db.pool())
        .await?)
}

/// Records use, at most once a minute per key so that reads do not become writes.
pub async fn touch(db: &Db, id: &str, now: i64) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 \
         AND (last_used_at IS NULL OR last_used_at < $3)",
    )
    .bind(now)
    .bind(id)
    .bind(now - 60_000)
    .execute(db.pool())
    .await?;
    Ok(())
}

pub async fn list(db: &Db, team_id: &str) -> Result<Vec<ApiKey>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM api_keys WHERE team_id = $1 ORDER BY created_at DESC, id DESC"
    );
    Ok(sqlx::query_as(&sql)
        .bind(team_id)
        .fetch_all(db.pool())
        .await?)
}

pub async fn get(db: &Db, team_id: &str, id: &str) -> Result<Option<ApiKey>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE team_id = $1 AND id = $2");
    Ok(sqlx::query_as(&sql)
        .bind(team_id)
        .bind(id)
        .fetch_optional(db.pool())
        .await?)
}

/// Revokes a key of `team_id`; `false` when there is no such live key.
pub async fn revoke(db: &Db, team_id: &str, id: &str) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE team_id = $2 AND id = $3 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(team_id)
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(res.rows_affected() == 1)
}
