//! `roost serve control` runs the control service; `roost control admin create` makes the
//! first platform administrator. Both only parse arguments: the service is assembled by
//! `roost_control::server`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use roost_control::api::internal::InternalToken;
use roost_control::auth::password::HashCost;
use roost_control::server::{self, AdminOutcome, Server, ServerConfig};

#[derive(Subcommand, Debug)]
pub enum ServeCommand {
    /// Run the control service: REST API (native /v1 and E2B), worker channel (QUIC), reaper.
    Control(ServeControlArgs),
    /// Run the gateway: TLS/HTTP edge proxy to control and sandbox ports (worker tunnels).
    Gateway(crate::cmd_gateway::ServeGatewayArgs),
    /// Run the worker host agent: register with control, run sandboxes it places here.
    Worker(crate::cmd_worker::ServeWorkerArgs),
}

#[derive(Subcommand, Debug)]
pub enum ControlCommand {
    /// Manage platform administrators in the control database.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create a platform administrator (or promote an existing user); idempotent.
    Create(AdminCreateArgs),
}

/// Where control keeps its state.
#[derive(Args, Debug)]
pub struct StoreArgs {
    /// Data directory: SQLite database, worker CA, session secret
    /// [default: $XDG_DATA_HOME/roost or ~/.local/share/roost].
    #[arg(long, env = "ROOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL (`postgres://user:pass@host/db`) instead of SQLite in the data directory.
    #[arg(long, env = "ROOST_DATABASE_URL")]
    database_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct ServeControlArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// TCP address of the REST API.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// UDP address of the QUIC worker channel.
    #[arg(long, default_value = "127.0.0.1:7443")]
    channel_listen: SocketAddr,
    /// HOST:PORT workers dial, given to them at registration [default: the bound channel address].
    #[arg(long)]
    channel_public_addr: Option<String>,
    /// Redis URL to share rate-limit windows with other control instances.
    #[arg(long, env = "ROOST_REDIS_URL")]
    redis_url: Option<String>,
    /// How often workers heartbeat (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// A host silent for this long is lost, with its sandboxes (e.g. 20s).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    host_lost_after: Duration,
    /// File with the session-signing secret (≥ 32 bytes, mode 0600)
    /// [default: `session-secret` in the data directory, generated on first start].
    #[arg(long)]
    jwt_secret_file: Option<PathBuf>,
    /// Make EMAIL a platform administrator before serving (password from
    /// ROOST_ADMIN_PASSWORD, or generated and printed once).
    #[arg(long, value_name = "EMAIL")]
    bootstrap_admin: Option<String>,
    /// How often the reaper enforces sandbox timeouts (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    reaper_interval: Duration,
    /// Token the gateway presents on /internal/v1 (≥ 32 characters; only its SHA-256 is kept).
    /// Without it (or --internal-token-sha256) the internal API is disabled.
    #[arg(long, env = "ROOST_INTERNAL_TOKEN", hide_env_values = true)]
    internal_token: Option<String>,
    /// The SHA-256 (hex) of the gateway's token, so the token itself need not be on this host.
    #[arg(long, conflicts_with = "internal_token")]
    internal_token_sha256: Option<String>,
}

#[derive(Args, Debug)]
pub struct AdminCreateArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The administrator's email (also the login).
    #[arg(long)]
    email: String,
}

/// Parses `500ms`, `5s`, `2m` or a bare number of seconds.
pub(crate) fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{raw}` is not a duration like 500ms, 5s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("`{raw}`: unknown unit `{unit}` (use ms, s or m)")),
    }
}

pub(crate) fn data_dir(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = arg {
        return Ok(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("roost"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither --data-dir, ROOST_DATA_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/roost"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run_serve(command: ServeCommand) -> Result<i32> {
    match command {
        ServeCommand::Control(args) => runtime()?.block_on(serve_control(args)),
        ServeCommand::Gateway(args) => crate::cmd_gateway::run(args),
        ServeCommand::Worker(args) => crate::cmd_worker::run(args),
    }
}

pub fn run_control(command: ControlCommand) -> Result<i32> {
    match command {
        ControlCommand::Admin(AdminCommand::Create(args)) => {
            runtime()?.block_on(admin_create(args))
        }
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub(crate) async fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        eprintln!("roost: {name} received, shutting down");
    })
}

async fn serve_control(args: ServeControlArgs) -> Result<i32> {
    let mut config = ServerConfig::new(data_dir(args.store.data_dir)?);
    config.database_url = args.store.database_url;
    config.listen = args.listen;
    config.channel_listen = args.channel_listen;
    config.channel_public_addr = args.channel_public_addr;
    config.redis_url = args.redis_url;
    config.heartbeat_interval = args.heartbeat_interval;
    config.host_lost_after = args.host_lost_after;
    config.session_secret_file = args.jwt_secret_file;
    config.reaper_interval = args.reaper_interval;
    config.internal_token = match (&args.internal_token, &args.internal_token_sha256) {
        (Some(token), _) => Some(InternalToken::from_secret(token).context("--internal-token")?),
        (None, Some(hash)) => {
            Some(InternalToken::from_sha256_hex(hash).context("--internal-token-sha256")?)
        }
        (None, None) => None,
    };
    let shutdown = shutdown_signal().await?;
    let server = Server::start(config).await?;
    if let Some(email) = &args.bootstrap_admin {
        make_admin(server.db(), email).await?;
    }
    let api = server.api_addr().context("cannot read the API address")?;
    let channel = server
        .channel_addr()
        .context("cannot read the channel address")?;
    println!("roost control: REST API on http://{api}, worker channel on udp://{channel}");
    std::io::stdout().flush().ok();
    server.run(shutdown).await?;
    Ok(0)
}

async fn admin_create(args: AdminCreateArgs) -> Result<i32> {
    let dir = data_dir(args.store.data_dir)?;
    if args.store.database_url.is_none() {
        server::prepare_data_dir(&dir)?;
    }
    let db = server::open_database(&dir, args.store.database_url.as_deref()).await?;
    let outcome = make_admin(&db, &args.email).await;
    db.close().await;
    outcome.map(|()| 0)
}

/// Creates or promotes `email`, telling the operator what happened (and a generated
/// password, once).
async fn make_admin(db: &roost_control::store::Db, email: &str) -> Result<()> {
    let (password, generated) = match std::env::var("ROOST_ADMIN_PASSWORD") {
        Ok(p) if !p.is_empty() => (p, false),
        _ => (
            server::generate_password().context("cannot generate a password")?,
            true,
        ),
    };
    let outcome = server::bootstrap_admin(db, email, &password, HashCost::RECOMMENDED)
        .await
        .with_context(|| format!("cannot make {email} a platform administrator"))?;
    match outcome {
        AdminOutcome::Created { user_id } if generated => println!(
            "created platform administrator {email} ({user_id}); password (shown once): {password}"
        ),
        AdminOutcome::Created { user_id } => println!(
            "created platform administrator {email} ({user_id}) with the password from ROOST_ADMIN_PASSWORD"
        ),
        AdminOutcome::Promoted {
            user_id,
            was_admin: true,
        } => {
            println!("{email} ({user_id}) is already a platform administrator; password unchanged")
        }
        AdminOutcome::Promoted {
            user_id,
            was_admin: false,
        } => println!(
            "existing user {email} ({user_id}) is now a platform administrator; password unchanged"
        ),
    }
    std::io::stdout().flush().ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn explicit_data_dir_wins() {
        assert_eq!(
            data_dir(Some(PathBuf::from("/x"))).unwrap(),
            PathBuf::from("/x")
        );
    }
}
