//! Idempotency keys for sandbox creation.
//!
//! The first request with a key inserts `(team, key, sha256(request))` with no sandbox yet;
//! when it finishes it records the sandbox id, and a failed create deletes the row so that a
//! retry can proceed. A later request with the same key then gets one of [`Claim`]'s outcomes.
//! Keys are scoped by team, so two teams may use the same key, and are purged after a day.

use super::{Db, StoreError, now_ms};

/// How long an unfinished claim blocks others before it is presumed abandoned (a crash).
pub const ABANDONED_AFTER_MS: i64 = 120_000;
/// How long a finished key is remembered.
pub const RETAIN_MS: i64 = 24 * 60 * 60 * 1000;

/// Outcome of presenting an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the key and must create the sandbox.
    Fresh,
    /// An identical request already created this sandbox.
    Replay { sandbox_id: String },
    /// An identical request is still being served.
    InProgress,
    /// The key was used with a different request body.
    Mismatch,
}

pub async fn claim(
    db: &Db,
    team_id: &str,
    key: &str,
    request_sha256: &str,
) -> Result<Claim, StoreError> {
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (team_id, key, request_sha256, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (team_id, key) DO NOTHING",
    )
    .bind(team_id)
    .bind(key)
    .bind(request_sha256)
    .bind(now)
    .execute(db.pool())
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Claim::Fresh);
    }
    let row: Option<(String, Option<String>, i64)> = sqlx::query_as(
        "SELECT request_sha256, sandbox_id, created_at FROM idempotency_keys \
         WHERE team_id = $1 AND key = $2",
    )
    .bind(team_id)
    .bind(key)
    .fetch_optional(db.pool())
    .await?;
    let Some((stored_sha, sandbox_id, created_at)) = row else {
        // Released between our insert and select: the other request failed; the caller retries.
        return Ok(Claim::InProgress);
    };
    if stored_sha != request_sha256 {
        return Ok(Claim::Mismatch);
    }
    if let Some(sandbox_id) = sandbox_id {
        return Ok(Claim::Replay { sandbox_id });
    }
    if created_at < now - ABANDONED_AFTER_MS {
        let taken = sqlx::query(
            "UPDATE idempotency_keys SET created_at = $1 WHERE team_id = $2 AND key = $3 \
             AND sandbox_id IS NULL AND created_at = $4",
        )
        .bind(now)
        .bind(team_id)
        .bind(key)
        .bind(created_at)
        .execute(db.pool())
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(Claim::Fresh);
        }
    }
    Ok(Claim::InProgress)
}

/// Records the sandbox the owning request created.
pub async fn complete(
    db: &Db,
    team_id: &str,
    key: &str,
    sandbox_id: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE idempotency_keys SET sandbox_id = $1 WHERE team_id = $2 AND key = $3")
        .bind(sandbox_id)
        .bind(team_id)
        .bind(key)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Forgets a claim whose request failed, so that a retry can create the sandbox.
pub async fn release(db: &Db, team_id: &str, key: &str) -> Result<(), StoreError> {
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE team_id = $1 AND key = $2 AND sandbox_id IS NULL",
    )
    .bind(team_id)
    .bind(key)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Deletes keys older than [`RETAIN_MS`]; returns how many.
pub async fn purge(db: &Db, now: i64) -> Result<u64, StoreError> {
    let res = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
        .bind(now - RETAIN_MS)
        .execute(db.pool())
        .await?;
    Ok(res.rows_affected())
}
