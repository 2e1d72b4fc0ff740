//! The E2B-compatible in-guest API ("envd") on TCP port 49983: the `process.Process` and
//! `filesystem.Filesystem` Connect services, `/files`, `/health`, `/envs`, and `/init` on a
//! private socket. See `docs/agent-envd.md` for the contract and the design choices.
//!
//! Messages are generated from envd's own .proto files (`proto/envd/`, recreated from the
//! e2b PyPI package) by prost + pbjson, which gives exactly the proto3-JSON mapping the
//! Connect JSON codec uses; the Connect framing itself is the small [`connect`] module over
//! axum (HTTP/1.1 with chunked bodies, and h2c, from one listener via hyper-util's auto
//! builder).

mod admin;
mod auth;
mod connect;
mod files;
mod filesystem;
mod fsuser;
pub mod options;
mod paths;
mod process;
mod proto;
mod signature;
mod state;
mod users;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tower_http::CompressionLevel;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;

pub use state::{DEFAULT_USER, SandboxConfig};

/// The envd version the agent implements (the SDK enables features by it; ≥ 0.6.4 is all).
pub const ENVD_VERSION: &str = "0.6.4";
/// The port E2B's SDKs expect the daemon on.
pub const DEFAULT_PORT: u16 = 49983;
/// Where the private `/init` socket lives inside the guest.
pub const DEFAULT_INIT_SOCKET: &str = "/run/roost/envd-init.sock";

/// How to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Unix socket for `POST /init`; `None` serves no `/init` at all.
    pub init_socket: Option<PathBuf>,
    pub config: SandboxConfig,
    /// Let `/init` set the wall clock (only as the VM's init).
    pub set_clock: bool,
    /// Reap our own children on SIGCHLD (not as PID 1, where init's reaper does it).
    pub reap_children: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            init_socket: Some(DEFAULT_INIT_SOCKET.into()),
            config: SandboxConfig {
                default_user: DEFAULT_USER.into(),
                ..SandboxConfig::default()
            },
            set_clock: false,
            reap_children: true,
        }
    }
}

/// The public router (everything on the TCP port).
fn public_router(envd: Arc<state::Envd>) -> Router {
    let protected = Router::new()
        .merge(process::routes())
        .merge(filesystem::routes())
        .route("/envs", get(admin::envs))
        .layer(DefaultBodyLimit::max(connect::MAX_MESSAGE_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            envd.clone(),
            auth::require_token,
        ));
    let files = Router::new()
        .route("/files", get(files::download).post(files::upload))
        .layer(DefaultBodyLimit::disable())
        .layer(RequestDecompressionLayer::new())
        // httpx asks for gzip on every download by default: spend little CPU on it.
        .layer(CompressionLayer::new().quality(CompressionLevel::Fastest));
    Router::new()
        .route("/health", get(admin::health))
        .route("/init", post(admin::init_refused))
        .merge(protected)
        .merge(files)
        .with_state(envd)
}

/// Binds the listeners (so the port is open when this returns) and serves on a new thread
/// with its own tokio runtime. For init, which keeps its main thread for itself.
pub fn start_in_background(options: ServeOptions) -> anyhow::Result<()> {
    // On the console: warnings only (request details must not flood it).
    init_logging("warn");
    let listener = std::net::TcpListener::bind(options.listen)
        .with_context(|| format!("binding {}", options.listen))?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("envd".into())
        .spawn(move || {
            if let Err(e) = run_with_listener(options, listener) {
                crate::say!("envd API stopped: {e:#}");
            }
        })
        .context("starting the envd thread")?;
    Ok(())
}

/// Serves until the process ends (`roost-agent serve`).
pub fn run(options: ServeOptions) -> anyhow::Result<()> {
    init_logging("info");
    let listener = std::net::TcpListener::bind(options.listen)
        .with_context(|| format!("binding {}", options.listen))?;
    listener.set_nonblocking(true)?;
    run_with_listener(options, listener)
}

fn run_with_listener(options: ServeOptions, listener: std::net::TcpListener) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("envd-worker")
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(serve(options, listener))
}

async fn serve(options: ServeOptions, listener: std::net::TcpListener) -> anyhow::Result<()> {
    let envd = state::Envd::new(options.config.clone());
    if options.reap_children {
        tokio::spawn(reap_on_sigchld());
    }
    if let Some(socket) = &options.init_socket {
        let init_listener = bind_private_socket(socket)?;
        let init_app = Router::new()
            .route("/init", post(admin::init))
            .with_state((envd.clone(), options.set_clock));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(init_listener, init_app).await {
                tracing::error!("init socket stopped: {e}");
            }
        });
    }
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tracing::info!(
        "envd API {ENVD_VERSION} on {} (init socket: {:?})",
        listener.local_addr()?,
        options.init_socket
    );
    axum::serve(listener, public_router(envd))
        .await
        .context("serving the envd API")
}

/// Logs to stderr, filtered by `RUST_LOG` or else `default`. Another part of the agent may
/// have installed a subscriber already; then that one stays.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A Unix socket only root can connect to (also the code interpreter's admin socket).
pub(crate) fn bind_private_socket(
    path: &std::path::Path,
) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// Outside PID 1: collect our children when they exit.
async fn reap_on_sigchld() {
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::error!("cannot watch SIGCHLD ({e}); polling for exited children");
            loop {
                crate::children::reap_registered();
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    // A periodic pass as well: signals coalesce, and one may arrive between spawn and record.
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigchld.recv() => {}
            _ = tick.tick() => {}
        }
        crate::children::reap_registered();
    }
}
