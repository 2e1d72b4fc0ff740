//! `roost-pager`: serve one restored VM's guest memory from a snapshot's memory chain over
//! userfaultfd, or merge a chain offline.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use roost_pager::server::{ServeOptions, WorkingSet, serve};
use roost_pager::{Chain, merge_if_deeper};

#[derive(Parser, Debug)]
#[command(
    name = "roost-pager",
    about = "Roost's userfaultfd page server and memory-chain tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the memory of the snapshot in DIR to the one VMM that connects to SOCKET.
    Serve {
        /// Snapshot directory holding memory.hdr.
        #[arg(long)]
        snapshot: PathBuf,
        /// Unix socket to listen on (a stale file is replaced; removed on exit).
        #[arg(long)]
        socket: PathBuf,
        /// Record the pages the VM touches into this file: written on SIGUSR1 (e.g. when the
        /// clone's first command finished) or when the VMM disconnects.
        #[arg(long)]
        record_working_set: Option<PathBuf>,
        /// Copy the pages of this recorded working set in first.
        #[arg(long)]
        prefetch: Option<PathBuf>,
        /// Give up if no VMM connects within this many seconds.
        #[arg(long, default_value_t = 30)]
        accept_timeout_secs: u64,
    },
    /// Merge the chain in DIR into one generation if it is deeper than --max-depth.
    Merge {
        dir: PathBuf,
        #[arg(long, default_value_t = roost_pager::DEFAULT_MAX_DEPTH)]
        max_depth: usize,
    },
}

static RECORD_NOW: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    RECORD_NOW.store(true, Ordering::Relaxed);
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve {
            snapshot,
            socket,
            record_working_set,
            prefetch,
            accept_timeout_secs,
        } => run_serve(
            snapshot,
            socket,
            record_working_set,
            prefetch,
            Duration::from_secs(accept_timeout_secs),
        ),
        Command::Merge { dir, max_depth } => {
            match merge_if_deeper(&dir, max_depth)
                .with_context(|| format!("merging {}", dir.display()))?
            {
                Some(s) => println!("merged: {} pages, depth {}", s.pages_written, s.depth),
                None => println!("chain is not deeper than {max_depth}; nothing to do"),
            }
            Ok(())
        }
    }
}

fn run_serve(
    snapshot: PathBuf,
    socket: PathBuf,
    record: Option<PathBuf>,
    prefetch: Option<PathBuf>,
    accept_timeout: Duration,
) -> Result<()> {
    let chain = Chain::open(&snapshot)
        .with_context(|| format!("opening the memory of snapshot {}", snapshot.display()))?;
    let prefetch = prefetch
        .map(|p| WorkingSet::load(&p, chain.header_sha256()))
        .transpose()?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", socket.display())),
    }
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    let _cleanup = RemoveOnDrop(socket.clone());
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + accept_timeout;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!(
                        "no VMM connected to {} within {accept_timeout:?}",
                        socket.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting the VMM's connection"),
        }
    };
    stream.set_nonblocking(false)?;
    tracing::info!(snapshot = %snapshot.display(), "VMM connected; serving guest memory");
    let options = ServeOptions {
        record,
        prefetch,
        record_now: Some(&RECORD_NOW),
    };
    let summary = serve(&chain, stream, &options).context("serving guest memory")?;
    tracing::info!(?summary, "page server done");
    Ok(())
}

/// Removes the socket file when the server ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
