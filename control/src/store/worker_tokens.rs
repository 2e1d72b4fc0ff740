//! One-time worker registration tokens: created by a platform admin, redeemed once by a new
//! worker (which becomes a host), refused after expiry. Only the SHA-256 of the secret is
//! stored, like API keys: the secret has 256 random bits, so a fast hash is enough.

use sha2::{Digest, Sha256};

use super::{Db, StoreError, now_ms, random_id};

/// Prefix of every registration token secret.
pub const PREFIX: &str = "rwt_";
const SECRET_BYTES: usize = 32;

/// A token as stored (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub created_by: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub host_id: Option<String>,
}

/// The SHA-256 (hex) under which `secret` is stored.
pub fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Creates a token valid until `expires_at` (Unix ms); returns it and its secret.
pub async fn create(
    db: &Db,
    name: &str,
    created_by: Option<&str>,
    expires_at: i64,
) -> Result<(Token, String), StoreError> {
    let secret = random_id(PREFIX, SECRET_BYTES)?;
    let token = Token {
        id: random_id("rwt_id_", 8)?,
        name: name.to_owned(),
        created_by: created_by.map(str::to_owned),
        created_at: now_ms(),
        expires_at,
        used_at: None,
        host_id: None,
    };
    sqlx::query(
        "INSERT INTO worker_registration_tokens (id, token_sha256, name, created_by, created_at, \
         expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&token.id)
    .bind(digest(&secret))
    .bind(&token.name)
    .bind(&token.created_by)
    .bind(token.created_at)
    .bind(token.expires_at)
    .execute(db.pool())
    .await?;
    Ok((token, secret))
}

/// Marks the unused, unexpired token with `secret` used at `now` and returns it; `None` when
/// no such token exists (unknown, already used or expired: the caller cannot tell which, and
/// neither can an attacker). The update is a single conditional statement, so two workers
/// racing with one token cannot both win.
pub async fn redeem(db: &Db, secret: &str, now: i64) -> Result<Option<Token>, StoreError> {
    Ok(sqlx::query_as(
        "UPDATE worker_registration_tokens SET used_at = $1 \
         WHERE token_sha256 = $2 AND used_at IS NULL AND expires_at > $1 \
         RETURNING id, name, created_by, created_at, expires_at, used_at, host_id",
    )
    .bind(now)
    .bind(digest(secret))
    .fetch_optional(db.pool())
    .await?)
}

/// Records which host a redeemed token created.
pub async fn set_host(db: &Db, token_id: &str, host_id: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE worker_registration_tokens SET host_id = $1 WHERE id = $2")
        .bind(host_id)
        .bind(token_id)
        .execute(db.pool())
        .await?;
    Ok(())
}
