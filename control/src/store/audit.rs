//! The audit log: one row per mutation, with who did it (user, API key or the system).

use super::{Db, StoreError, now_ms};

/// Who performed an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    User(String),
    ApiKey(String),
    System,
}

impl Actor {
    fn kind(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::ApiKey(_) => "api_key",
            Self::System => "system",
        }
    }

    fn id(&self) -> Option<&str> {
        match self {
            Self::User(id) | Self::ApiKey(id) => Some(id),
            Self::System => None,
        }
    }
}

/// A mutation to record.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub team_id: Option<&'a str>,
    pub actor: &'a Actor,
    pub action: &'a str,
    pub target_kind: &'a str,
    pub target_id: Option<&'a str>,
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Entry {
    pub id: i64,
    pub team_id: Option<String>,
    pub actor_kind: String,
    pub actor_id: Option<String>,
    pub action: String,
    pub target_kind: String,
    pub target_id: Option<String>,
    pub details: String,
    pub created_at: i64,
}

pub async fn record<'e, E>(exec: E, event: Event<'_>) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO audit_log (team_id, actor_kind, actor_id, action, target_kind, target_id, \
         details, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(event.team_id)
    .bind(event.actor.kind())
    .bind(event.actor.id())
    .bind(event.action)
    .bind(event.target_kind)
    .bind(event.target_id)
    .bind(event.details.to_string())
    .bind(now_ms())
    .execute(exec)
    .await?;
    Ok(())
}

/// A page of `team_id`'s entries, newest first, with ids below `before`.
pub async fn list(
    db: &Db,
    team_id: &str,
    before: Option<i64>,
    action: Option<&str>,
    limit: i64,
) -> Result<Vec<Entry>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT id, team_id, actor_kind, actor_id, action, target_kind, target_id, details, \
         created_at FROM audit_log WHERE team_id = $1 AND id < $2 \
         AND ($3 = '' OR action = $3) ORDER BY id DESC LIMIT $4",
    )
    .bind(team_id)
    .bind(before.unwrap_or(i64::MAX))
    .bind(action.unwrap_or(""))
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    Ok(rows)
}
