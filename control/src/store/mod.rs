//! Storage: every table of the control plane behind one [`Db`] handle.
//!
//! # Why `sqlx::AnyPool` and not a trait over two pools
//! Roost runs on SQLite (embedded default) or PostgreSQL. A trait with one implementation per
//! engine would duplicate every query and every row mapping, and the two copies would drift.
//! `AnyPool` lets each query be written once, at the price of three rules that the whole schema
//! follows (see `migrations/README.md`):
//! - only portable column types (`TEXT`, `BIGINT`): timestamps are Unix milliseconds, booleans
//!   `0`/`1`, JSON is `TEXT`;
//! - placeholders are always `$1, $2, ...` (PostgreSQL's form, which SQLite also accepts;
//!   `sqlx::QueryBuilder` is not used because under `Any` it emits `?`);
//! - SQL is the common subset (`ON CONFLICT DO NOTHING`, `RETURNING`, no JSON operators).
//!
//! What genuinely differs per engine — the migrations and connection set-up — is chosen by
//! [`Engine`]. Each submodule owns one table (or a closely related pair) and its queries.

pub mod api_keys;
pub mod audit;
pub mod changes;
pub mod hosts;
pub mod idempotency;
pub mod sandboxes;
pub mod teams;
pub mod templates;
pub mod users;
pub mod worker_tokens;

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{AnyPool, Executor};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl FromStr for Engine {
    type Err = ConnectError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(ConnectError::UnsupportedUrl)
        }
    }
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("database URL must start with `sqlite:` or `postgres://`")]
    UnsupportedUrl,
    #[error("cannot create data directory {0}")]
    DataDir(String, #[source] std::io::Error),
    #[error("cannot connect to the database")]
    Connect(#[source] sqlx::Error),
    #[error("cannot switch SQLite to write-ahead logging")]
    Wal(#[source] sqlx::Error),
    #[error("cannot apply migrations")]
    Migrate(#[source] MigrateError),
}

/// A failed query. Lookups that find nothing return `Ok(None)`, not an error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("stored value in {column} is malformed")]
    Corrupt {
        column: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the operating system's random source failed")]
    Entropy(#[source] getrandom::Error),
}

/// The control plane's database.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    engine: Engine,
    changes: changes::Feed,
}

impl Db {
    /// Opens (creating if needed) the embedded SQLite database `control.db` in `data_dir`.
    pub async fn open_data_dir(data_dir: &Path) -> Result<Self, ConnectError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| ConnectError::DataDir(data_dir.display().to_string(), e))?;
        let file = data_dir.join("control.db");
        Self::connect(&format!("sqlite://{}?mode=rwc", file.display())).await
    }

    /// Connects to `url` (`sqlite:` or `postgres://`) and applies pending migrations.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let engine: Engine = url.parse()?;
        install_default_drivers();
        let max = match engine {
            // SQLite serialises writers anyway; a few readers beside the writer are enough.
            Engine::Sqlite => 4,
            Engine::Postgres => 16,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(ConnectError::Connect)?;
        if engine == Engine::Sqlite {
            // WAL is a property of the database file, so setting it once persists it.
            pool.execute("PRAGMA journal_mode = WAL")
                .await
                .map_err(ConnectError::Wal)?;
        }
        let migrator = match engine {
            Engine::Sqlite => &SQLITE_MIGRATIONS,
            Engine::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&pool).await.map_err(ConnectError::Migrate)?;
        tracing::info!(?engine, "control database ready");
        Ok(Self {
            pool,
            engine,
            changes: changes::Feed::new(),
        })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Sandbox route changes made through this handle (and its clones) from now on.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<changes::SandboxChange> {
        self.changes.subscribe()
    }

    pub(crate) fn announce(&self, sandbox_id: &str, kind: changes::ChangeKind) {
        self.changes.send(sandbox_id, kind);
    }

    /// Closes every connection; used by tests before dropping a scratch database.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch, the unit of every stored timestamp.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// `prefix` followed by `bytes` random bytes in hex: ids for users, teams, keys and hosts.
pub fn random_id(prefix: &str, bytes: usize) -> Result<String, StoreError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(StoreError::Entropy)?;
    Ok(format!("{prefix}{}", hex::encode(buf)))
}

/// True when `err` is a unique-constraint violation (on either engine).
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}
