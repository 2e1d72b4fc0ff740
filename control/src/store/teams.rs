//! Teams and memberships. A membership's role is the only source of authority over a team:
//! it is read from here on every request, never trusted from a token.

use std::fmt;
use std::str::FromStr;

use super::{Db, StoreError, is_unique_violation, now_ms, random_id};

/// A member's role in a team, from least to most powerful.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name stored in the database that this build does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?}")]
pub struct UnknownRole(String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "member" => Ok(Self::Member),
            "admin" => Ok(Self::Admin),
            "owner" => Ok(Self::Owner),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

fn parse_role(s: &str) -> Result<Role, StoreError> {
    s.parse().map_err(|e: UnknownRole| StoreError::Corrupt {
        column: "memberships.role",
        source: Box::new(e),
    })
}

/// A team as seen by one of its members.
#[derive(Debug, Clone)]
pub struct TeamMembership {
    pub team_id: String,
    pub name: String,
    pub role: Role,
}

/// A member as listed inside a team.
#[derive(Debug, Clone)]
pub struct Member {
    pub user_id: String,
    pub email: String,
    pub role: Role,
    pub created_at: i64,
}

/// Creates a team owned by `owner`.
pub async fn create(db: &Db, owner: &str, name: &str) -> Result<String, StoreError> {
    let now = now_ms();
    let id = random_id("team_", 12)?;
    let mut tx = db.pool().begin().await?;
    sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(&id)
        .bind(name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO memberships (team_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&id)
    .bind(owner)
    .bind(Role::Owner.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// The caller's role in `team_id`, or `None` when they are not a member (or it does not exist).
pub async fn role_of(db: &Db, team_id: &str, user_id: &str) -> Result<Option<Role>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT role FROM memberships WHERE team_id = $1 AND user_id = $2")
            .bind(team_id)
            .bind(user_id)
            .fetch_optional(db.pool())
            .await?;
    row.map(|(r,)| parse_role(&r)).transpose()
}

/// Every team `user_id` belongs to, oldest membership first.
pub async fn for_user(db: &Db, user_id: &str) -> Result<Vec<TeamMembership>, StoreError> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT t.id, t.name, m.role FROM memberships m JOIN teams t ON t.id = m.team_id \
         WHERE m.user_id = $1 ORDER BY m.created_at, t.id",
    )
    .bind(user_id)
    .fetch_all(db.pool())
    .await?;
    rows.into_iter()
        .map(|(team_id, name, role)| {
            Ok(TeamMembership {
                team_id,
                name,
                role: parse_role(&role)?,
            })
        })
        .collect()
}

pub async fn members(db: &Db, team_id: &str) -> Result<Vec<Member>, StoreError> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT u.id, u.email, m.role, m.created_at FROM memberships m \
         JOIN users u ON u.id = m.user_id WHERE m.team_id = $1 ORDER BY m.created_at, u.id",
    )
    .bind(team_id)
    .fetch_all(db.pool())
    .await?;
    rows.into_iter()
        .map(|(user_id, email, role, created_at)| {
            Ok(Member {
                user_id,
                email,
                role: parse_role(&role)?,
                created_at,
            })
        })
        .collect()
}

/// Adds `user_id` to the team; `false` when they already are a member.
pub async fn add_member(
    db: &Db,
    team_id: &str,
    user_id: &str,
    role: Role,
) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "INSERT INTO memberships (team_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(team_id)
    .bind(user_id)
    .bind(role.as_str())
    .bind(now_ms())
    .execute(db.pool())
    .await;
    match res {
        Ok(_) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sets a member's role; `false` when they are not a member.
pub async fn set_role(
    db: &Db,
    team_id: &str,
    user_id: &str,
    role: Role,
) -> Result<bool, StoreError> {
    let res = sqlx::query("UPDATE memberships SET role = $1 WHERE team_id = $2 AND user_id = $3")
        .bind(role.as_str())
        .bind(team_id)
        .bind(user_id)
        .execute(db.pool())
        .await?;
    Ok(res.rows_affected() == 1)
}

/// Removes a member; `false` when they were not a member.
pub async fn remove_member(db: &Db, team_id: &str, user_id: &str) -> Result<bool, StoreError> {
    let res = sqlx::query("DELETE FROM memberships WHERE team_id = $1 AND user_id = $2")
        .bind(team_id)
        .bind(user_id)
        .execute(db.pool())
        .await?;
    Ok(res.rows_affected() == 1)
}

pub async fn owner_count(db: &Db, team_id: &str) -> Result<i64, StoreError> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM memberships WHERE team_id = $1 AND role = 'owner'")
            .bind(team_id)
            .fetch_one(db.pool())
            .await?;
    Ok(n)
}
