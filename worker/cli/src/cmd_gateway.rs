//! `roost serve gateway`: the edge proxy in the foreground. This file only turns arguments
//! into a `roost_gateway::server::GatewayConfig`, binds the worker tunnel endpoint and runs
//! the Pingora server; everything else lives in the `roost-gateway` crate.
//!
//! Signals (Pingora's): SIGTERM drains (listeners close after `--grace-period`, requests then
//! get `--shutdown-timeout` to finish), SIGINT stops at once.

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use roost_gateway::ratelimit::Limit;
use roost_gateway::routes::control::HttpControl;
use roost_gateway::routes::redis_events::RedisRouteEvents;
use roost_gateway::server::{self, GatewayConfig, TlsListener};
use roost_gateway::tunnel::{TunnelHub, TunnelHubConfig};

use crate::cmd_serve::{data_dir, parse_duration};

#[derive(Args, Debug)]
pub struct ServeGatewayArgs {
    /// Domain served: `api.<domain>`, `<port>-<sandbox id>.<domain>`, `sandbox.<domain>`.
    #[arg(long, env = "ROOST_DOMAIN")]
    domain: String,
    /// HTTPS listener (HTTP/1.1 and h2); needs --cert and --key.
    #[arg(long, requires_all = ["cert", "key"])]
    listen_tls: Option<SocketAddr>,
    /// Plain-HTTP listener (HTTP/1.1), for local use.
    #[arg(long)]
    listen_http: Option<SocketAddr>,
    /// Prometheus `/metrics` listener.
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen_metrics: SocketAddr,
    /// PEM certificate chain for `<domain>` and `*.<domain>` (`roost certs init` makes one).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Control's HTTP address: `api.<domain>` is proxied there, routes are read from it.
    #[arg(
        long,
        env = "ROOST_CONTROL_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    control_url: String,
    /// Shared token for control's internal API (control keeps only its SHA-256).
    #[arg(long, env = "ROOST_INTERNAL_TOKEN", hide_env_values = true)]
    internal_token: String,
    #[command(flatten)]
    tunnel: Box<TunnelArgs>,
    /// Requests per second per client IP (0: no limit).
    #[arg(long, default_value_t = 200)]
    ip_rate: u32,
    /// Burst allowance per client IP.
    #[arg(long, default_value_t = 400)]
    ip_burst: u32,
    /// Requests per second per API key (0: no limit).
    #[arg(long, default_value_t = 100)]
    key_rate: u32,
    /// Burst allowance per API key.
    #[arg(long, default_value_t = 200)]
    key_burst: u32,
    /// Do not resume paused sandboxes when a request arrives for them.
    #[arg(long)]
    no_auto_resume: bool,
    /// Longest wait for an auto-resume (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    resume_timeout: Duration,
    /// Longest wait for a tunnel stream to a sandbox port to open.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    dial_timeout: Duration,
    /// Follow route changes on Redis pub/sub (needed when several control instances run,
    /// each started with the same `--redis-url`) instead of control's event stream.
    #[arg(long, value_name = "URL", env = "ROOST_REDIS_URL")]
    redis_url: Option<String>,
    /// The Redis channel control publishes route changes on (its key prefix + `routes`).
    #[arg(long, default_value = roost_gateway::routes::redis_events::DEFAULT_CHANNEL)]
    redis_channel: String,
    /// After SIGTERM, how long listeners stay open while load balancers notice.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    grace_period: Duration,
    /// Then how long running requests may finish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Proxy worker threads [default: the number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

/// The worker tunnel endpoint (boxed: it keeps the `serve` subcommand enum small).
#[derive(Args, Debug)]
struct TunnelArgs {
    /// UDP address workers dial (QUIC tunnel, mutual TLS).
    #[arg(long, default_value = "0.0.0.0:7444")]
    tunnel_listen: SocketAddr,
    /// CA that signs worker certificates (control's `worker-ca.pem`).
    #[arg(long)]
    worker_ca: PathBuf,
    /// Certificate and key the tunnel endpoint shows workers [default: --cert / --key].
    #[arg(long, requires = "tunnel_key")]
    tunnel_cert: Option<PathBuf>,
    #[arg(long, requires = "tunnel_cert")]
    tunnel_key: Option<PathBuf>,
    /// Data directory holding the tunnel endpoint's restart secret
    /// [default: $XDG_DATA_HOME/roost or ~/.local/share/roost].
    #[arg(long, env = "ROOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

pub fn run(args: ServeGatewayArgs) -> Result<i32> {
    let tls = match (args.listen_tls, &args.cert, &args.key) {
        (Some(addr), Some(cert), Some(key)) => Some(TlsListener {
            addr,
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, _, _) => None,
        _ => bail!("--listen-tls needs --cert and --key"),
    };
    if tls.is_none() && args.listen_http.is_none() {
        bail!("give --listen-tls (with --cert/--key) and/or --listen-http");
    }
    let control_addr = control_socket_addr(&args.control_url)?;
    let control = HttpControl::new(
        &args.control_url,
        &args.internal_token,
        Duration::from_secs(10),
    )?;
    let config = GatewayConfig {
        domain: args.domain.trim().to_owned(),
        tls,
        listen_http: args.listen_http,
        listen_metrics: Some(args.listen_metrics),
        control_addr,
        threads: args.threads.map_or_else(
            || std::thread::available_parallelism().map_or(2, |n| n.get()),
            usize::from,
        ),
        grace_period: args.grace_period,
        shutdown_timeout: args.shutdown_timeout,
        per_ip_limit: limit(args.ip_rate, args.ip_burst, "--ip-burst")?,
        per_key_limit: limit(args.key_rate, args.key_burst, "--key-burst")?,
        auto_resume: !args.no_auto_resume,
        resume_timeout: args.resume_timeout,
        route_ttl: Duration::from_secs(60),
        dial_timeout: args.dial_timeout,
        redis_route_events: args
            .redis_url
            .as_deref()
            .map(|url| RedisRouteEvents::new(url, args.redis_channel.clone()))
            .transpose()
            .context("--redis-url")?,
    };

    let tunnel = *args.tunnel;
    let (tunnel_cert, tunnel_key) = match (
        &tunnel.tunnel_cert,
        &tunnel.tunnel_key,
        &args.cert,
        &args.key,
    ) {
        (Some(cert), Some(key), _, _) | (None, None, Some(cert), Some(key)) => {
            (cert.clone(), key.clone())
        }
        _ => bail!(
            "the tunnel endpoint needs a certificate: give --tunnel-cert/--tunnel-key or --cert/--key"
        ),
    };
    let data_dir = data_dir(tunnel.data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let hub_config = TunnelHubConfig::from_files(
        tunnel.tunnel_listen,
        &tunnel_cert,
        &tunnel_key,
        &tunnel.worker_ca,
        &data_dir.join("gateway-tunnel-secret"),
    )?;
    // The tunnel endpoint gets a runtime of its own: Pingora's service runtimes stop at
    // shutdown, the workers' connections must outlive the last proxied request.
    let tunnel_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tunnel")
        .enable_all()
        .build()
        .context("cannot start the tunnel runtime")?;
    let hub = tunnel_runtime
        .block_on(async { TunnelHub::bind(hub_config) })
        .context("cannot start the tunnel endpoint")?;

    let (gateway, _parts) = server::build(&config, Arc::new(hub.clone()), Arc::new(control))?;
    tracing::info!(
        domain = %config.domain,
        tls = ?config.tls.as_ref().map(|t| t.addr),
        http = ?config.listen_http,
        metrics = %args.listen_metrics,
        tunnel = %tunnel.tunnel_listen,
        "gateway serving"
    );
    gateway.run_until_signalled();
    hub.close();
    tunnel_runtime.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(2), hub.wait_idle()).await;
    });
    Ok(0)
}

/// `http://host:port` → the address `api.<domain>` traffic is proxied to.
fn control_socket_addr(url: &str) -> Result<SocketAddr> {
    let authority = url
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or(rest))
        .filter(|a| !a.is_empty())
        .with_context(|| format!("--control-url {url:?} must look like http://host:port"))?;
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve control's address {with_port}"))?
        .next()
        .with_context(|| format!("control's address {with_port} resolves to nothing"))
}

fn limit(rate: u32, burst: u32, burst_flag: &str) -> Result<Option<Limit>> {
    let Some(per_second) = NonZeroU32::new(rate) else {
        return Ok(None);
    };
    let burst =
        NonZeroU32::new(burst).with_context(|| format!("{burst_flag} must be at least 1"))?;
    Ok(Some(Limit { per_second, burst }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls() {
        assert_eq!(
            control_socket_addr("http://127.0.0.1:3000").unwrap(),
            "127.0.0.1:3000".parse().unwrap()
        );
        assert_eq!(
            control_socket_addr("http://127.0.0.1:3000/")
                .unwrap()
                .port(),
            3000
        );
        assert_eq!(control_socket_addr("http://127.0.0.1").unwrap().port(), 80);
        assert!(control_socket_addr("https://127.0.0.1:3000").is_err());
        assert!(control_socket_addr("127.0.0.1:3000").is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(limit(0, 5, "--x").unwrap(), None);
        assert!(limit(5, 0, "--x").is_err());
        assert_eq!(limit(5, 10, "--x").unwrap().unwrap().burst.get(), 10);
    }
}
