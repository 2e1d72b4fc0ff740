//! `roost net`: the worker's sandbox networking by hand, for operators and for the host-VM
//! tests.
//!
//! - `roost net run [POLICY] -- CMD`: gives one sandbox networking (namespace, veth, tap, NAT,
//!   egress policy, DNS forwarder), runs CMD inside its namespace with `ROOST_VM_NET_TAP` and
//!   `ROOST_VM_NET_MAC` set (so `roost vm run` or `roost sandbox run` started by CMD attach a
//!   virtio-net device to the tap), then removes everything and exits with CMD's status.
//! - `roost net cleanup`: removes every stale `roost-` namespace, interface and the host table
//!   (what the worker does at start-up after a crash).
//! - `roost net list`: what is there now (one `KIND NAME` line each).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Instant;

use anyhow::Context;
use roost_net::{EgressPolicy, Ipv4Net, NetConfig, NetManager, addr};
use tokio::signal::unix::{SignalKind, signal};

/// `roost net` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum NetCommand {
    /// Give one sandbox networking, run CMD inside its namespace, then remove it all.
    Run(NetRunArgs),
    /// Remove stale `roost-` namespaces, interfaces and the host nftables table.
    Cleanup,
    /// List `roost-` namespaces, host interfaces and whether the host table exists.
    List,
}

/// Options of `roost net run`.
#[derive(clap::Args, Debug)]
pub struct NetRunArgs {
    /// `allow_internet_access`: destinations neither list names are reachable.
    #[arg(long)]
    pub internet: bool,
    /// `network.allowOut` entry: IPv4 address, CIDR, host name or `*.domain` (repeatable).
    #[arg(long = "allow-out", value_name = "DEST")]
    pub allow_out: Vec<String>,
    /// `network.denyOut` entry (repeatable); `allowOut` wins over it.
    #[arg(long = "deny-out", value_name = "DEST")]
    pub deny_out: Vec<String>,
    /// Destinations no sandbox may reach besides the built-in ones (control plane, worker
    /// addresses), as CIDRs (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub reserved: Vec<Ipv4Net>,
    /// Upstream DNS resolver of the forwarder [default: first nameserver of /etc/resolv.conf].
    #[arg(long, value_name = "ADDR:PORT")]
    pub upstream_dns: Option<SocketAddr>,
    /// Range the per-sandbox host /30s come from.
    #[arg(long, default_value_t = addr::DEFAULT_POOL_RANGE)]
    pub pool_range: Ipv4Net,
    /// The command to run inside the sandbox's namespace.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Runs a `roost net` subcommand.
pub fn run(command: NetCommand) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match command {
            NetCommand::Run(args) => net_run(args).await,
            NetCommand::Cleanup => {
                let report = roost_net::remove_stale().await?;
                for name in &report.namespaces {
                    println!("removed namespace {name}");
                }
                for name in &report.links {
                    println!("removed interface {name}");
                }
                if report.host_table {
                    println!("removed nftables table ip roost");
                }
                Ok(0)
            }
            NetCommand::List => {
                let found = roost_net::inventory().await?;
                for name in &found.namespaces {
                    println!("netns {name}");
                }
                for name in &found.links {
                    println!("link {name}");
                }
                if found.host_table {
                    println!("table ip roost");
                }
                Ok(0)
            }
        }
    })
}

/// The first `nameserver` of /etc/resolv.conf, port 53.
pub fn system_resolver() -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .context("no --upstream-dns and cannot read /etc/resolv.conf")?;
    text.lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .context("no --upstream-dns and no nameserver in /etc/resolv.conf")
}

async fn net_run(args: NetRunArgs) -> anyhow::Result<i32> {
    let policy = EgressPolicy::parse(args.internet, &args.allow_out, &args.deny_out)
        .context("invalid --allow-out/--deny-out")?;
    let upstream = match args.upstream_dns {
        Some(addr) => addr,
        None => system_resolver()?,
    };
    let config = NetConfig {
        pool_range: args.pool_range,
        reserved: args.reserved,
        pool_size: 0,
        upstream_dns: upstream,
    };
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let started = Instant::now();
    let manager = NetManager::start(config).await?;
    let net = manager.acquire(policy).await?;
    eprintln!(
        "roost: network ready in {} ms: netns {} tap {} guest {} mac {} host {}",
        started.elapsed().as_millis(),
        net.netns(),
        net.tap_name(),
        net.guest_ip(),
        addr::format_mac(&net.guest_mac()),
        net.addrs().host_veth,
    );
    let mut command = std::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("ROOST_VM_NET_TAP", net.tap_name())
        .env("ROOST_VM_NET_MAC", addr::format_mac(&net.guest_mac()))
        .stdin(Stdio::inherit());
    let outcome = async {
        net.command_in(&mut command)?;
        let mut child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", args.command[0]))?;
        // A stop request goes to the command (a sandbox CLI shuts its VM down cleanly on
        // SIGTERM); the network is removed once it has exited.
        let status = tokio::select! {
            status = child.wait() => status.context("waiting for the command")?,
            _ = interrupt.recv() => stop(&mut child, nix::sys::signal::Signal::SIGINT).await?,
            _ = terminate.recv() => stop(&mut child, nix::sys::signal::Signal::SIGTERM).await?,
        };
        anyhow::Ok(status)
    }
    .await;
    let released = manager.release(net).await;
    let shut = manager.shutdown().await;
    let status = outcome?;
    released.context("removing the sandbox's network")?;
    shut.context("shutting the network manager down")?;
    Ok(status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    }))
}

/// How long a command may take to end after being signalled before it is killed.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Sends `signal` to the command and waits for it (killing it after [`STOP_GRACE`]).
async fn stop(
    child: &mut tokio::process::Child,
    signal: nix::sys::signal::Signal,
) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            child.kill().await.ok();
            Ok(child.wait().await?)
        }
    }
}
