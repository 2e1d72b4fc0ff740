//! Sandboxes and their metadata pairs.
//!
//! Every user-facing query takes the caller's team id and includes it in its `WHERE` clause:
//! a sandbox of another team is indistinguishable from one that does not exist. Only the
//! reaper's [`expired`] query spans teams. Metadata is stored twice: as a JSON object for
//! display and as `(key, value)` rows that filters match by exact equality, so user input is
//! never a pattern.

use std::collections::BTreeMap;

use super::changes::ChangeKind;
use super::{Db, StoreError, now_ms};
use crate::lifecycle::state::SandboxState;

/// A sandbox as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub team_id: String,
    pub template_id: String,
    pub state: SandboxState,
    pub metadata: BTreeMap<String, String>,
    pub env_var_names: Vec<String>,
    pub host_id: Option<String>,
    pub cpu_count: i64,
    pub memory_mb: i64,
    pub disk_size_mb: i64,
    pub envd_version: String,
    pub envd_access_token: Option<String>,
    pub auto_pause: bool,
    pub allow_internet: bool,
    pub created_at: i64,
    pub started_at: i64,
    pub updated_at: i64,
    pub end_at: i64,
    pub ended_at: Option<i64>,
    /// Whether ports other than envd's are open to anyone; otherwise they need
    /// `traffic_access_token` (the gateway checks it).
    pub allow_public_traffic: bool,
    pub traffic_access_token: Option<String>,
    /// E2B `network.allowOut` / `network.denyOut`, as the user wrote them (validated at
    /// creation with `roost_proto::egress`); sent to the worker on every create and resume.
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    team_id: String,
    template_id: String,
    state: String,
    metadata: String,
    env_var_names: String,
    host_id: Option<String>,
    cpu_count: i64,
    memory_mb: i64,
    disk_size_mb: i64,
    envd_version: String,
    envd_access_token: Option<String>,
    auto_pause: i64,
    allow_internet: i64,
    created_at: i64,
    started_at: i64,
    updated_at: i64,
    end_at: i64,
    ended_at: Option<i64>,
    allow_public_traffic: i64,
    traffic_access_token: Option<String>,
    allow_out: String,
    deny_out: String,
}

const COLUMNS: &str = "s.id, s.team_id, s.template_id, s.state, s.metadata, s.env_var_names, \
    s.host_id, s.cpu_count, s.memory_mb, s.disk_size_mb, s.envd_version, s.envd_access_token, \
    s.auto_pause, s.allow_internet, s.created_at, s.started_at, s.updated_at, s.end_at, s.ended_at, \
    s.allow_public_traffic, s.traffic_access_token, s.allow_out, s.deny_out";

fn corrupt(column: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Corrupt {
        column,
        source: Box::new(e),
    }
}

impl TryFrom<Row> for Sandbox {
    type Error = StoreError;

    fn try_from(r: Row) -> Result<Self, StoreError> {
        Ok(Self {
            state: r.state.parse().map_err(|e| corrupt("sandboxes.state", e))?,
            metadata: serde_json::from_str(&r.metadata)
                .map_err(|e| corrupt("sandboxes.metadata", e))?,
            env_var_names: serde_json::from_str(&r.env_var_names)
                .map_err(|e| corrupt("sandboxes.env_var_names", e))?,
            allow_out: serde_json::from_str(&r.allow_out)
                .map_err(|e| corrupt("sandboxes.allow_out", e))?,
            deny_out: serde_json::from_str(&r.deny_out)
                .map_err(|e| corrupt("sandboxes.deny_out", e))?,
            id: r.id,
            team_id: r.team_id,
            template_id: r.template_id,
            host_id: r.host_id,
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            envd_version: r.envd_version,
            envd_access_token: r.envd_access_token,
            auto_pause: r.auto_pause != 0,
            allow_internet: r.allow_internet != 0,
            created_at: r.created_at,
            started_at: r.started_at,
            updated_at: r.updated_at,
            end_at: r.end_at,
            ended_at: r.ended_at,
            allow_public_traffic: r.allow_public_traffic != 0,
            traffic_access_token: r.traffic_access_token,
        })
    }
}

/// Inserts a new sandbox (normally in state `creating`) with its metadata rows.
pub async fn insert(db: &Db, s: &Sandbox) -> Result<(), StoreError> {
    let metadata =
        serde_json::to_string(&s.metadata).map_err(|e| corrupt("sandboxes.metadata", e))?;
    let env_names = serde_json::to_string(&s.env_var_names)
        .map_err(|e| corrupt("sandboxes.env_var_names", e))?;
    let allow_out =
        serde_json::to_string(&s.allow_out).map_err(|e| corrupt("sandboxes.allow_out", e))?;
    let deny_out =
        serde_json::to_string(&s.deny_out).map_err(|e| corrupt("sandboxes.deny_out", e))?;
    let mut tx = db.pool().begin().await?;
    sqlx::query(
        "INSERT INTO sandboxes (id, team_id, template_id, state, metadata, env_var_names, host_id, \
         cpu_count, memory_mb, disk_size_mb, envd_version, envd_access_token, auto_pause, \
         allow_internet, created_at, started_at, updated_at, end_at, ended_at, \
         allow_public_traffic, traffic_access_token, allow_out, deny_out) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, \
         $20, $21, $22, $23)",
    )
    .bind(&s.id)
    .bind(&s.team_id)
    .bind(&s.template_id)
    .bind(s.state.as_str())
    .bind(metadata)
    .bind(env_names)
    .bind(&s.host_id)
    .bind(s.cpu_count)
    .bind(s.memory_mb)
    .bind(s.disk_size_mb)
    .bind(&s.envd_version)
    .bind(&s.envd_access_token)
    .bind(i64::from(s.auto_pause))
    .bind(i64::from(s.allow_internet))
    .bind(s.created_at)
    .bind(s.started_at)
    .bind(s.updated_at)
    .bind(s.end_at)
    .bind(s.ended_at)
    .bind(i64::from(s.allow_public_traffic))
    .bind(&s.traffic_access_token)
    .bind(allow_out)
    .bind(deny_out)
    .execute(&mut *tx)
    .await?;
    for (key, value) in &s.metadata {
        sqlx::query("INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES ($1, $2, $3)")
            .bind(&s.id)
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    db.announce(&s.id, ChangeKind::Changed);
    Ok(())
}

/// `team_id`'s sandbox `id`, in any state.
pub async fn get(db: &Db, team_id: &str, id: &str) -> Result<Option<Sandbox>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM sandboxes s WHERE s.team_id = $1 AND s.id = $2");
    let row: Option<Row> = sqlx::query_as(&sql)
        .bind(team_id)
        .bind(id)
        .fetch_optional(db.pool())
        .await?;
    row.map(Sandbox::try_from).transpose()
}

/// Position after which a page starts: the last row of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct After {
    pub created_at: i64,
    pub id: String,
}

/// Filters for [`list`]. An empty `states` means every state.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub states: Vec<SandboxState>,
    pub metadata: Vec<(String, String)>,
    pub after: Option<After>,
    pub limit: u32,
}

enum Param {
    Text(String),
    Int(i64),
}

/// A page of `team_id`'s sandboxes, newest first, and whether more follow.
pub async fn list(
    db: &Db,
    team_id: &str,
    q: &ListQuery,
) -> Result<(Vec<Sandbox>, bool), StoreError> {
    let mut params = vec![Param::Text(team_id.to_owned())];
    let mut push = |p: Param| {
        params.push(p);
        format!("${}", params.len())
    };
    let mut sql = format!("SELECT {COLUMNS} FROM sandboxes s WHERE s.team_id = $1");
    if !q.states.is_empty() {
        let placeholders: Vec<String> = q
            .states
            .iter()
            .map(|s| push(Param::Text(s.as_str().to_owned())))
            .collect();
        sql.push_str(&format!(" AND s.state IN ({})", placeholders.join(", ")));
    }
    for (key, value) in &q.metadata {
        let k = push(Param::Text(key.clone()));
        let v = push(Param::Text(value.clone()));
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id \
             AND m.key = {k} AND m.value = {v})"
        ));
    }
    if let Some(after) = &q.after {
        let c = push(Param::Int(after.created_at));
        let i = push(Param::Text(after.id.clone()));
        sql.push_str(&format!(
            " AND (s.created_at < {c} OR (s.created_at = {c} AND s.id < {i}))"
        ));
    }
    let l = push(Param::Int(i64::from(q.limit) + 1));
    sql.push_str(&format!(" ORDER BY s.created_at DESC, s.id DESC LIMIT {l}"));

    let mut query = sqlx::query_as::<_, Row>(&sql);
    for p in params {
        query = match p {
            Param::Text(s) => query.bind(s),
            Param::Int(i) => query.bind(i),
        };
    }
    let mut rows = query.fetch_all(db.pool()).await?;
    let more = rows.len() > usize::try_from(q.limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(q.limit).unwrap_or(usize::MAX));
    let sandboxes = rows
        .into_iter()
        .map(Sandbox::try_from)
        .collect::<Result<_, _>>()?;
    Ok((sandboxes, more))
}

/// Fields a state change may also set; `None` keeps the stored value.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub host_id: Option<String>,
    pub started_at: Option<i64>,
    pub end_at: Option<i64>,
}

/// Moves sandbox `id` from `from` to `to` if it is still in `from` (compare-and-set).
/// `team_id` is `None` only for system actors (the reaper). Returns whether it moved.
pub async fn compare_and_set(
    db: &Db,
    team_id: Option<&str>,
    id: &str,
    from: SandboxState,
    to: SandboxState,
    changes: Changes,
) -> Result<bool, StoreError> {
    let now = now_ms();
    let ended_at = to.is_terminal().then_some(now);
    let res = sqlx::query(
        "UPDATE sandboxes SET state = $1, updated_at = $2, host_id = COALESCE($3, host_id), \
         started_at = COALESCE($4, started_at), end_at = COALESCE($5, end_at), \
         ended_at = COALESCE($6, ended_at) \
         WHERE id = $7 AND state = $8 AND ($9 = '' OR team_id = $9)",
    )
    .bind(to.as_str())
    .bind(now)
    .bind(changes.host_id)
    .bind(changes.started_at)
    .bind(changes.end_at)
    .bind(ended_at)
    .bind(id)
    .bind(from.as_str())
    .bind(team_id.unwrap_or(""))
    .execute(db.pool())
    .await?;
    let moved = res.rows_affected() == 1;
    if moved {
        let kind = if to.is_terminal() {
            ChangeKind::Removed
        } else {
            ChangeKind::Changed
        };
        db.announce(id, kind);
    }
    Ok(moved)
}

/// Sets when a sandbox times out, if it is still in `state`; returns whether it was.
pub async fn set_end_at(
    db: &Db,
    team_id: &str,
    id: &str,
    end_at: i64,
    state: SandboxState,
) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "UPDATE sandboxes SET end_at = $1, updated_at = $2 WHERE team_id = $3 AND id = $4 \
         AND state = $5",
    )
    .bind(end_at)
    .bind(now_ms())
    .bind(team_id)
    .bind(id)
    .bind(state.as_str())
    .execute(db.pool())
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Running sandboxes of every team whose timeout passed at `now`, oldest deadline first.
pub async fn expired(db: &Db, now: i64, limit: i64) -> Result<Vec<Sandbox>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM sandboxes s WHERE s.state = 'running' AND s.end_at <= $1 \
         ORDER BY s.end_at LIMIT $2"
    );
    let rows: Vec<Row> = sqlx::query_as(&sql)
        .bind(now)
        .bind(limit)
        .fetch_all(db.pool())
        .await?;
    rows.into_iter().map(Sandbox::try_from).collect()
}

/// Most ids bound in one `IN (...)` list (well under SQLite's and PostgreSQL's limits).
const IN_CHUNK: usize = 500;

/// Sandbox `id` of any team, in any state: only for trusted internal callers (the gateway's
/// route lookups).
pub async fn get_any_team(db: &Db, id: &str) -> Result<Option<Sandbox>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM sandboxes s WHERE s.id = $1");
    let row: Option<Row> = sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(db.pool())
        .await?;
    row.map(Sandbox::try_from).transpose()
}

/// The sandboxes among `ids`, of any team, by id: only for system actors (reconciling a
/// heartbeat's whole sandbox list in a few queries instead of one per sandbox).
pub async fn get_many_any_team(
    db: &Db,
    ids: &[&str],
) -> Result<std::collections::HashMap<String, Sandbox>, StoreError> {
    let mut found = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(IN_CHUNK) {
        let sql = format!(
            "SELECT {COLUMNS} FROM sandboxes s WHERE s.id IN ({})",
            bind_list(1, chunk.len())
        );
        let mut query = sqlx::query_as::<_, Row>(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(db.pool()).await? {
            let sandbox = Sandbox::try_from(row)?;
            found.insert(sandbox.id.clone(), sandbox);
        }
    }
    Ok(found)
}

/// Sandboxes of every team placed on `host_id` in one of `states`: only for system actors
/// (lost hosts and reconciliation).
pub async fn on_host(
    db: &Db,
    host_id: &str,
    states: &[SandboxState],
) -> Result<Vec<Sandbox>, StoreError> {
    if states.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {COLUMNS} FROM sandboxes s WHERE s.host_id = $1 AND s.state IN ({}) \
         ORDER BY s.created_at, s.id",
        bind_list(2, states.len())
    );
    let mut query = sqlx::query_as::<_, Row>(&sql).bind(host_id);
    for state in states {
        query = query.bind(state.as_str());
    }
    let rows = query.fetch_all(db.pool()).await?;
    rows.into_iter().map(Sandbox::try_from).collect()
}

/// `$first, $first+1, ...` for `count` bind parameters of an `IN (...)` list.
fn bind_list(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
