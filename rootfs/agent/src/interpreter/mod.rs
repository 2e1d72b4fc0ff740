//! The E2B code interpreter on port 49999: `/execute` streams NDJSON, `/contexts` manages
//! stateful Jupyter Python kernels (see `E2B-COMPAT.md`, "Code interpreter on port 49999").
//!
//! ## Design: a Rust Jupyter client, no Python bridge
//! Each context is an `ipykernel` process driven directly over the Jupyter wire protocol
//! (ZeroMQ, HMAC-signed messages) with `jupyter-zmq-client` (runtimed's maintained client,
//! formerly `runtimelib`, on the pure-Rust `zeromq` crate). The alternative, a small Python
//! bridge on `jupyter_client` inside the image, would add a second Python process (and its
//! ~0.3 s of imports) in front of every kernel, a private IPC protocol between it and the
//! agent, and a second place where interrupts and restarts are handled. With the Rust client
//! the agent owns the kernel processes itself: it knows their pids (interrupt = SIGINT to the
//! process group, as Jupyter does), sees them exit, and starts them in the user's name.
//! Kernel start-up is the kernel's own (importing IPython), see `README.md` for figures.
//!
//! ## Layout
//! - [`options`]: the subcommand's flags. [`server`]: routes, token, errors. [`admin`]: the
//!   private socket where the agent's identity operation replaces the token.
//! - [`contexts`]: contexts and the default one. [`execution`]: one `/execute`.
//! - [`sandbox_env`]: the sandbox's env vars, from envd.
//! - [`kernel`]: a kernel process and its ZeroMQ channels. [`translate`]: Jupyter messages →
//!   output lines. [`env_vars`]: per-execution environment variables. [`wire`]: the JSON.
//! - [`guest`]: how init starts the interpreter in the `code-interpreter` image.
//!
//! It runs as its own process (`roost-agent interpreter`), not inside PID 1: its kernels are
//! then its own children, reaped by tokio, and never by init's `waitpid(-1)` loop.

pub mod admin;
pub mod contexts;
pub mod env_vars;
pub mod execution;
pub mod guest;
pub mod kernel;
pub mod options;
pub mod sandbox_env;
pub mod server;
pub mod translate;
pub mod wire;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
pub use options::InterpreterOptions;

use contexts::Contexts;
use kernel::process::{KernelCommand, KernelUser};

/// First line on stdout once the server listens: `roost-agent interpreter: listening on ADDR`.
pub const LISTENING_PREFIX: &str = "roost-agent interpreter: listening on ";

/// Runs the server until SIGTERM or SIGINT.
pub fn run(options: &InterpreterOptions) -> ExitCode {
    init_logging();
    unblock_signals();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("interpreter")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("roost-agent interpreter: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roost-agent interpreter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Started by init, this process inherits init's blocked signals (SIGINT, SIGTERM, SIGCHLD...;
/// `std::process::Command` does not reset the mask), and so would the kernels: SIGINT would
/// never interrupt a cell. Unblock everything before any thread or child exists.
fn unblock_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
    if let Err(e) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        tracing::warn!("cannot unblock signals: {e}");
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zeromq=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(options: &InterpreterOptions) -> anyhow::Result<()> {
    let user = KernelUser::lookup(&options.user).context("kernel user")?;
    let default_cwd = options.cwd.clone().unwrap_or_else(|| user.home.clone());
    let command = KernelCommand {
        python: options.python.clone(),
        user,
        runtime_dir: options.runtime_dir.clone(),
        extra_env: options.kernel_env.clone(),
    };
    let contexts = Arc::new(Contexts::new(
        command,
        default_cwd,
        options.kernel_start_timeout,
    ));
    let state = Arc::new(server::AppState::new(
        Arc::clone(&contexts),
        options.access_token.as_deref(),
        options.envd,
    ));
    // Bound before the public port opens: once /health answers, the token can be handed over.
    if let Some(socket) = &options.admin_socket {
        admin::serve(socket, Arc::clone(&state)).context("admin socket")?;
    }
    let address = SocketAddr::new(options.listen, options.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let bound = listener.local_addr().context("listening address")?;
    println!("{LISTENING_PREFIX}{bound}");
    tracing::info!(%bound, "code interpreter listening");

    // The default context starts in the background; executions wait for it.
    let warm_up = Arc::clone(&contexts);
    tokio::spawn(async move {
        if let Err(e) = warm_up.default_context().await {
            tracing::error!("cannot start the default context: {e:#}");
        }
    });

    // Kernels go first, so that running cells end and the graceful shutdown does not wait.
    let stopping = async move {
        stop_signal().await;
        contexts.shut_down_all().await;
    };
    axum::serve(listener, server::router(state))
        .with_graceful_shutdown(stopping)
        .await
        .context("serving")?;
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT; stop me with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: killing the kernels");
}
