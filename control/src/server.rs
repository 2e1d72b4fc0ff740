//! A complete control service in one process: the pieces of this crate assembled the way an
//! operator runs them (`roost serve control`), so that the binary stays a thin argument parser.
//!
//! [`Server::start`] checks the configuration and binds everything before anything is served
//! (a bad data directory, database URL, occupied port or loose key permissions fail here, with
//! the thing to fix in the message); [`Server::run`] serves until a shutdown future resolves,
//! then stops accepting, lets in-flight requests finish, closes the worker channel and the
//! database. [`bootstrap_admin`] creates (or promotes) the first platform administrator.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::api::internal::InternalToken;
use crate::api::v1::workers::WorkerRegistration;
use crate::api::{self, AppState, Config};
use crate::auth::password::{self, HashCost};
use crate::lifecycle::{Sandboxes, reaper};
use crate::pki::{ControlCa, PkiError};
use crate::ratelimit::shared::{SharedError, SharedWindows};
use crate::route_events::RoutePublisher;
use crate::store::{ConnectError, Db, StoreError, audit, users};
use crate::workers::{ChannelConfig, ChannelError, WorkerChannel};

/// Name of the generated session-signing secret in the data directory.
pub const SESSION_SECRET_FILE: &str = "session-secret";
/// Shortest accepted session secret, in bytes.
const MIN_SECRET_BYTES: usize = 32;
/// Longest wait for the database (connect and migrations) before giving up.
const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for worker connections to finish closing on shutdown.
const CHANNEL_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Key prefix for this service's shared state in Redis.
const REDIS_PREFIX: &str = "roost:";

/// How to run the control service.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Holds the SQLite database (unless `database_url` is set), the worker CA and the
    /// generated session secret.
    pub data_dir: PathBuf,
    /// `postgres://...` (or `sqlite:...`); `None` uses `control.db` in the data directory.
    pub database_url: Option<String>,
    /// TCP address of the REST API.
    pub listen: SocketAddr,
    /// UDP address of the QUIC worker channel.
    pub channel_listen: SocketAddr,
    /// `HOST:PORT` that workers dial, told to them at registration; `None` uses the bound
    /// channel address.
    pub channel_public_addr: Option<String>,
    /// Redis for rate-limit windows shared between control instances.
    pub redis_url: Option<String>,
    pub heartbeat_interval: Duration,
    pub host_lost_after: Duration,
    /// File holding the session-signing secret; `None` uses (and on first start creates)
    /// [`SESSION_SECRET_FILE`] in the data directory.
    pub session_secret_file: Option<PathBuf>,
    /// How often the reaper enforces sandbox timeouts.
    pub reaper_interval: Duration,
    /// The gateway's token for the internal API (hash only); `None` disables it.
    pub internal_token: Option<InternalToken>,
}

impl ServerConfig {
    /// Defaults: API on 127.0.0.1:3000, worker channel on 127.0.0.1:7443, SQLite in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        let channel = ChannelConfig::new(SocketAddr::from(([127, 0, 0, 1], 7443)));
        Self {
            data_dir,
            database_url: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            channel_listen: channel.listen,
            channel_public_addr: None,
            redis_url: None,
            heartbeat_interval: channel.heartbeat_interval,
            host_lost_after: channel.lost_after,
            session_secret_file: None,
            reaper_interval: Duration::from_secs(5),
            internal_token: None,
        }
    }
}

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path} is not usable (check that it exists and is writable)")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("session secret file {path} cannot be read or created")]
    SecretIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "session secret file {path} is readable by group or others (mode {mode:o}); chmod 600 it"
    )]
    SecretMode { path: String, mode: u32 },
    #[error("session secret file {path} holds fewer than {MIN_SECRET_BYTES} bytes")]
    SecretTooShort { path: String },
    #[error(
        "cannot listen for the REST API on {addr} (is the port in use? choose another with --listen)"
    )]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database {target}")]
    Database {
        target: String,
        #[source]
        source: ConnectError,
    },
    #[error("the database {target} did not answer within {DB_CONNECT_TIMEOUT:?}")]
    DatabaseTimeout { target: String },
    #[error("cannot load the worker CA in {path}")]
    Ca {
        path: String,
        #[source]
        source: PkiError,
    },
    #[error(
        "cannot start the worker channel on UDP {addr} (is the port in use? choose another with --channel-listen)"
    )]
    Channel {
        addr: SocketAddr,
        #[source]
        source: ChannelError,
    },
    #[error("invalid timing: {0}")]
    Timing(&'static str),
    #[error("cannot connect to Redis at {url}")]
    Redis {
        url: String,
        #[source]
        source: SharedError,
    },
    #[error("the REST API stopped")]
    Serve(#[source] std::io::Error),
    #[error("the operating system's random source failed")]
    Entropy(#[source] getrandom::Error),
}

/// A started control service: everything bound, nothing served yet.
pub struct Server {
    listener: tokio::net::TcpListener,
    channel: WorkerChannel,
    state: AppState,
    db: Db,
    reaper_interval: Duration,
    /// Publishes route changes on Redis, when Redis is configured.
    publisher: Option<RoutePublisher>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("api", &self.api_addr().ok())
            .field("channel", &self.channel_addr().ok())
            .finish_non_exhaustive()
    }
}

/// A user-facing description of a database URL without its password.
fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() => {
            let userinfo = &rest[..at - scheme.len() - 3];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{}", &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Opens the configured database (applying migrations), bounded in time.
pub async fn open_database(data_dir: &Path, database_url: Option<&str>) -> Result<Db, ServerError> {
    let target = match database_url {
        Some(url) => redact_url(url),
        None => data_dir.join("control.db").display().to_string(),
    };
    let opening = async {
        match database_url {
            Some(url) => {
                // One plain connection first: the pool would retry until its timeout and
                // report only that, hiding the cause (refused, bad password, no database).
                if url.parse::<crate::store::Engine>().is_ok() {
                    use sqlx::Connection;
                    sqlx::any::install_default_drivers();
                    let probe = sqlx::AnyConnection::connect(url)
                        .await
                        .map_err(ConnectError::Connect)?;
                    probe.close().await.map_err(ConnectError::Connect)?;
                }
                Db::connect(url).await
            }
            None => Db::open_data_dir(data_dir).await,
        }
    };
    match tokio::time::timeout(DB_CONNECT_TIMEOUT, opening).await {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(source)) => Err(ServerError::Database { target, source }),
        Err(_) => Err(ServerError::DatabaseTimeout { target }),
    }
}

/// Creates `dir` if needed and checks that files can be created in it.
pub fn prepare_data_dir(dir: &Path) -> Result<(), ServerError> {
    let fail = |source| ServerError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(".roost-write-probe");
    fs::write(&probe, b"").map_err(fail)?;
    fs::remove_file(&probe).map_err(fail)
}

/// Reads the session secret from `path`, creating a random one (mode 0600) if it is missing.
fn load_or_create_secret(path: &Path, create: bool) -> Result<Vec<u8>, ServerError> {
    let io = |source| ServerError::SecretIo {
        path: path.display().to_string(),
        source,
    };
    if create && !path.exists() {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(ServerError::Entropy)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(hex::encode(bytes).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)?;
        tracing::info!(path = %path.display(), "created session secret");
    }
    let mode = fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ServerError::SecretMode {
            path: path.display().to_string(),
            mode: mode & 0o777,
        });
    }
    let secret = fs::read(path).map_err(io)?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(ServerError::SecretTooShort {
            path: path.display().to_string(),
        });
    }
    Ok(secret)
}

impl Server {
    /// Checks the configuration and binds the API and the worker channel.
    pub async fn start(config: ServerConfig) -> Result<Self, ServerError> {
        if config.heartbeat_interval.is_zero() {
            return Err(ServerError::Timing(
                "the heartbeat interval must be positive",
            ));
        }
        if config.host_lost_after <= config.heartbeat_interval {
            return Err(ServerError::Timing(
                "hosts must be declared lost only after more than one heartbeat interval",
            ));
        }
        if config.reaper_interval.is_zero() {
            return Err(ServerError::Timing("the reaper interval must be positive"));
        }
        prepare_data_dir(&config.data_dir)?;
        let secret = match &config.session_secret_file {
            Some(path) => load_or_create_secret(path, false)?,
            None => load_or_create_secret(&config.data_dir.join(SESSION_SECRET_FILE), true)?,
        };
        // Bind the API first: an occupied port is the most common mistake and the cheapest
        // to report.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let db = open_database(&config.data_dir, config.database_url.as_deref()).await?;
        let ca = ControlCa::load_or_create(&config.data_dir).map_err(|source| ServerError::Ca {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let mut channel_config = ChannelConfig::new(config.channel_listen);
        channel_config.heartbeat_interval = config.heartbeat_interval;
        channel_config.lost_after = config.host_lost_after;
        let server_name = channel_config.server_name.clone();
        let channel = WorkerChannel::start(db.clone(), &ca, channel_config)
            .await
            .map_err(|source| ServerError::Channel {
                addr: config.channel_listen,
                source,
            })?;
        let channel_address = match &config.channel_public_addr {
            Some(addr) => addr.clone(),
            None => channel
                .local_addr()
                .map_err(|source| ServerError::Channel {
                    addr: config.channel_listen,
                    source: ChannelError::Bind(config.channel_listen, source),
                })?
                .to_string(),
        };
        let mut api_config = Config::new(secret);
        api_config.internal_token = config.internal_token;
        let mut publisher = None;
        if let Some(url) = &config.redis_url {
            let redis_error = |source| ServerError::Redis {
                url: redact_url(url),
                source,
            };
            let windows = SharedWindows::connect(url, REDIS_PREFIX)
                .await
                .map_err(redis_error)?;
            api_config.shared_limits = Some(windows);
            publisher = Some(
                RoutePublisher::connect(url, REDIS_PREFIX)
                    .await
                    .map_err(redis_error)?,
            );
        }
        let registration = WorkerRegistration {
            ca: Arc::new(ca),
            server_name,
            channel_address,
        };
        let sandboxes = Sandboxes::new(db.clone(), Arc::new(channel.placement()));
        let state = AppState::with_workers(sandboxes, api_config, Some(registration));
        Ok(Self {
            listener,
            channel,
            state,
            db,
            reaper_interval: config.reaper_interval,
            publisher,
        })
    }

    /// The service's database (for operator actions before serving, such as
    /// [`bootstrap_admin`]).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The bound REST API address.
    pub fn api_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The bound QUIC worker-channel address.
    pub fn channel_addr(&self) -> std::io::Result<SocketAddr> {
        self.channel.local_addr()
    }

    /// The HTTP application (the API, `GET /health` included).
    fn app(&self) -> Router {
        api::router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then stops accepting, finishes in-flight requests,
    /// closes worker connections and the database.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let reaper = reaper::spawn(self.state.sandboxes.clone(), self.reaper_interval);
        let publisher = self.publisher.take().map(|p| {
            tracing::info!(channel = p.channel(), "publishing route changes on Redis");
            p.spawn(&self.db)
        });
        tracing::info!(
            api = ?self.listener.local_addr().ok(),
            channel = ?self.channel.local_addr().ok(),
            "control service running"
        );
        let app = self.app();
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        tracing::info!("REST API stopped; closing the worker channel");
        reaper.abort();
        if let Some(publisher) = publisher {
            publisher.abort();
        }
        self.channel.close();
        if tokio::time::timeout(CHANNEL_CLOSE_TIMEOUT, self.channel.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("worker connections did not finish closing in time");
        }
        self.db.close().await;
        served.map_err(ServerError::Serve)
    }
}

/// What [`bootstrap_admin`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOutcome {
    /// A new user, now platform administrator, with this password.
    Created { user_id: String },
    /// The user existed and is now (or already was) platform administrator; the password was
    /// left unchanged.
    Promoted { user_id: String, was_admin: bool },
}

/// Why the first administrator could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("`{0}` is not a valid email address")]
    BadEmail(String),
    #[error("the password must be 8 to 1024 characters long")]
    BadPassword,
    #[error("cannot hash the password")]
    Hash(#[source] password::PasswordError),
    #[error("database query failed")]
    Store(#[from] StoreError),
    #[error("user {0} vanished while being promoted")]
    Vanished(String),
}

/// Normalises an email the way sign-up does (trimmed, lower case, `local@domain.tld`).
fn normalise_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && !email.chars().any(char::is_whitespace);
    valid.then_some(email)
}

/// Records that the operator made `user` a platform administrator (actor: system).
async fn audit_admin(db: &Db, user: &users::User, action: &str) -> Result<(), StoreError> {
    audit::record(
        db.pool(),
        audit::Event {
            team_id: Some(&user.default_team_id),
            actor: &audit::Actor::System,
            action,
            target_kind: "user",
            target_id: Some(&user.id),
            details: serde_json::json!({"platformAdmin": true}),
        },
    )
    .await
}

/// Makes `email` a platform administrator: creates the user (with a personal team) and
/// `password` if absent, promotes them otherwise. Idempotent.
pub async fn bootstrap_admin(
    db: &Db,
    email: &str,
    password: &str,
    cost: HashCost,
) -> Result<AdminOutcome, AdminError> {
    let email = normalise_email(email).ok_or_else(|| AdminError::BadEmail(email.to_owned()))?;
    if let Some(user) = users::by_email(db, &email).await? {
        let was_admin = users::is_platform_admin(db, &user.id).await?;
        if !users::set_platform_admin(db, &user.id, true).await? {
            return Err(AdminError::Vanished(user.id));
        }
        if !was_admin {
            audit_admin(db, &user, "user.platform_admin.grant").await?;
        }
        return Ok(AdminOutcome::Promoted {
            user_id: user.id,
            was_admin,
        });
    }
    if !(8..=1024).contains(&password.chars().count()) {
        return Err(AdminError::BadPassword);
    }
    let owned = password.to_owned();
    let hash = tokio::task::spawn_blocking(move || password::hash(&owned, cost))
        .await
        .map_err(|_| AdminError::BadPassword)?
        .map_err(AdminError::Hash)?;
    let user = match users::create_with_team(db, &email, &hash, "Platform admins").await? {
        Some(user) => user,
        // Created concurrently by someone else: promote that one.
        None => {
            let user = users::by_email(db, &email)
                .await?
                .ok_or_else(|| AdminError::Vanished(email.clone()))?;
            users::set_platform_admin(db, &user.id, true).await?;
            audit_admin(db, &user, "user.platform_admin.grant").await?;
            return Ok(AdminOutcome::Promoted {
                user_id: user.id,
                was_admin: false,
            });
        }
    };
    users::set_platform_admin(db, &user.id, true).await?;
    audit_admin(db, &user, "user.platform_admin.create").await?;
    tracing::info!(user = %user.id, "created platform administrator");
    Ok(AdminOutcome::Created { user_id: user.id })
}

/// A random password for a generated administrator account (24 hex characters).
pub fn generate_password() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u@db:5432/x"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact_url("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
    }

    #[test]
    fn secret_is_created_0600_and_loose_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let first = load_or_create_secret(&path, true).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create_secret(&path, true).unwrap(), first);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_secret(&path, true),
            Err(ServerError::SecretMode { mode: 0o644, .. })
        ));
        let short = dir.path().join("short");
        fs::write(&short, "abc").unwrap();
        fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create_secret(&short, false),
            Err(ServerError::SecretTooShort { .. })
        ));
        assert!(matches!(
            load_or_create_secret(&dir.path().join("missing"), false),
            Err(ServerError::SecretIo { .. })
        ));
    }

    #[tokio::test]
    async fn bootstrap_admin_is_idempotent_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_data_dir(dir.path()).await.unwrap();
        let created = bootstrap_admin(&db, " Ops@Example.com", "password123", HashCost::TESTING)
            .await
            .unwrap();
        let AdminOutcome::Created { user_id } = created else {
            panic!("expected a new user, got {created:?}");
        };
        assert!(users::is_platform_admin(&db, &user_id).await.unwrap());
        let team = users::by_id(&db, &user_id)
            .await
            .unwrap()
            .unwrap()
            .default_team_id;
        let entries = audit::list(&db, &team, None, None, 10).await.unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0].action, "user.platform_admin.create");
        assert_eq!(entries[0].actor_kind, "system");
        assert_eq!(
            bootstrap_admin(&db, "ops@example.com", "ignored!!", HashCost::TESTING)
                .await
                .unwrap(),
            AdminOutcome::Promoted {
                user_id: user_id.clone(),
                was_admin: true
            }
        );
        assert!(matches!(
            bootstrap_admin(&db, "not-an-email", "password123", HashCost::TESTING).await,
            Err(AdminError::BadEmail(_))
        ));
        assert!(matches!(
            bootstrap_admin(&db, "new@example.com", "short", HashCost::TESTING).await,
            Err(AdminError::BadPassword)
        ));
    }
}
