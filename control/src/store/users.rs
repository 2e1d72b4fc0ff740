//! Users: an email, an argon2id password hash and a personal (default) team.

use super::{Db, StoreError, is_unique_violation, now_ms, random_id};
use crate::store::teams::Role;

/// A stored user. The password hash never leaves the store except for verification.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: String,
    pub email: String,
    pub password_hash: String,
    pub default_team_id: String,
    pub created_at: i64,
}

const COLUMNS: &str = "id, email, password_hash, default_team_id, created_at";

/// Creates a user together with a personal team they own, in one transaction.
/// Returns `None` when the email is already registered.
pub async fn create_with_team(
    db: &Db,
    email: &str,
    password_hash: &str,
    team_name: &str,
) -> Result<Option<User>, StoreError> {
    let now = now_ms();
    let user_id = random_id("usr_", 12)?;
    let team_id = random_id("team_", 12)?;
    let mut tx = db.pool().begin().await?;
    sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(&team_id)
        .bind(team_name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, password_hash, default_team_id, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&user_id)
    .bind(email)
    .bind(password_hash)
    .bind(&team_id)
    .bind(now)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    sqlx::query(
        "INSERT INTO memberships (team_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&team_id)
    .bind(&user_id)
    .bind(Role::Owner.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(User {
        id: user_id,
        email: email.to_owned(),
        password_hash: password_hash.to_owned(),
        default_team_id: team_id,
        created_at: now,
    }))
}

pub async fn by_email(db: &Db, email: &str) -> Result<Option<User>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE email = $1");
    Ok(sqlx::query_as(&sql)
        .bind(email)
        .fetch_optional(db.pool())
        .await?)
}

pub async fn by_id(db: &Db, id: &str) -> Result<Option<User>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
    Ok(sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(db.pool())
        .await?)
}

/// Whether user `id` is a platform administrator (may manage workers and hosts).
pub async fn is_platform_admin(db: &Db, id: &str) -> Result<bool, StoreError> {
    let row: Option<(i64,)> = sqlx::query_as("SELECT is_platform_admin FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.is_some_and(|(flag,)| flag != 0))
}

/// Grants or withdraws platform administration (an operator action, from the CLI).
pub async fn set_platform_admin(db: &Db, id: &str, admin: bool) -> Result<bool, StoreError> {
    let res = sqlx::query("UPDATE users SET is_platform_admin = $1 WHERE id = $2")
        .bind(i64::from(admin))
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(res.rows_affected() == 1)
}
