//! Assembles the gateway's Pingora server: the proxy on a TLS listener (HTTP/1.1 + h2) and an
//! optional plain-HTTP one, the metrics listener, the route sync and housekeeping background
//! services. The caller supplies how to reach sandboxes (the tunnel hub) and control.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;

use crate::metrics::{Metrics, MetricsApp};
use crate::proxy::GatewayProxy;
use crate::ratelimit::{Limit, RateLimits};
use crate::routes::ControlApi;
use crate::routes::cache::RouteCache;
use crate::routes::resolver::{Resolver, ResolverConfig};
use crate::routes::sync::RouteSync;
use crate::target::Router;
use crate::upstream::SandboxDialer;
use crate::upstream::bridge::{Bridge, BridgeDir, BridgeError};

/// How long an idle pooled connection to a sandbox port (and its tunnel stream) is kept.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// Everything `roost serve gateway` configures.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Bare domain: `api.<domain>`, `<port>-<id>.<domain>`, `sandbox.<domain>`.
    pub domain: String,
    /// HTTPS listener (HTTP/1.1 and h2) with `cert`/`key` (PEM; the certificate should cover
    /// `<domain>` and `*.<domain>`).
    pub tls: Option<TlsListener>,
    /// Plain HTTP/1.1 listener (local use).
    pub listen_http: Option<SocketAddr>,
    /// Prometheus `/metrics` listener.
    pub listen_metrics: Option<SocketAddr>,
    /// Control's HTTP address: `api.<domain>` is proxied there.
    pub control_addr: SocketAddr,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// After SIGTERM: how long listeners stay open to drain, then how long requests may finish.
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    pub per_ip_limit: Option<Limit>,
    pub per_key_limit: Option<Limit>,
    pub auto_resume: bool,
    pub resume_timeout: Duration,
    /// Safety-net lifetime of a cached route (events normally invalidate it first).
    pub route_ttl: Duration,
    /// Longest wait for a tunnel stream to open (the worker's answer included).
    pub dial_timeout: Duration,
    /// Follow route changes on this Redis channel (every control instance publishes there)
    /// instead of the one control's event stream.
    pub redis_route_events: Option<crate::routes::redis_events::RedisRouteEvents>,
}

#[derive(Debug, Clone)]
pub struct TlsListener {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The gateway could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no listener configured: give a TLS or a plain-HTTP address")]
    NoListener,
    #[error("cannot use certificate {cert} / key {key}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: Box<pingora::Error>,
    },
    #[error("certificate or key path {0} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    #[error("cannot set up the tunnel bridge")]
    Bridge(#[from] BridgeError),
}

/// Shared state the tests and the CLI may want to look at.
#[derive(Debug, Clone)]
pub struct GatewayParts {
    pub metrics: Arc<Metrics>,
    pub routes: Arc<RouteCache>,
    /// The tunnel bridge's socket (removed with its directory when the server stops).
    pub bridge_socket: PathBuf,
}

/// The assembled gateway, ready to run.
pub struct GatewayServer {
    server: Server,
    /// Removed once the server has stopped.
    bridge_dir: BridgeDir,
}

impl std::fmt::Debug for GatewayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayServer")
            .field("bridge_dir", &self.bridge_dir)
            .finish_non_exhaustive()
    }
}

impl GatewayServer {
    /// Runs until SIGTERM (graceful: grace period, then the shutdown timeout) or SIGINT
    /// (immediate). Blocks the calling thread; Pingora makes its own runtimes.
    pub fn run_until_signalled(self) {
        self.server.run(pingora::server::RunArgs::default());
        drop(self.bridge_dir);
    }

    /// Runs until `stop` turns true (or its sender is dropped), then stops at once.
    pub fn run_until_stopped(self, stop: tokio::sync::watch::Receiver<bool>) {
        self.server.run(pingora::server::RunArgs {
            shutdown_signal: Box::new(StopSignal(stop)),
        });
        drop(self.bridge_dir);
    }
}

/// Builds the gateway's Pingora server and its services.
pub fn build(
    config: &GatewayConfig,
    dialer: Arc<dyn SandboxDialer>,
    control: Arc<dyn ControlApi>,
) -> Result<(GatewayServer, GatewayParts), BuildError> {
    if config.tls.is_none() && config.listen_http.is_none() {
        return Err(BuildError::NoListener);
    }
    pingora::tls::install_default_crypto_provider();
    let conf = ServerConf {
        threads: config.threads.max(1),
        grace_period_seconds: Some(config.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.shutdown_timeout.as_secs()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let metrics = Arc::new(Metrics::new());
    let routes = Arc::new(RouteCache::new(config.route_ttl));
    let limits = Arc::new(RateLimits::new(config.per_ip_limit, config.per_key_limit));
    let resolver = Arc::new(Resolver::new(
        control.clone(),
        routes.clone(),
        ResolverConfig {
            auto_resume: config.auto_resume,
            resume_timeout: config.resume_timeout,
        },
        metrics.clone(),
    ));
    let (bridge, bridge_dir) = Bridge::bind(dialer)?;
    let bridge_socket = bridge.path().to_owned();
    let proxy = GatewayProxy {
        router: Router::new(&config.domain),
        control_addr: config.control_addr,
        resolver,
        bridge: bridge.path().to_owned(),
        upstream_idle: UPSTREAM_IDLE,
        limits: limits.clone(),
        metrics: metrics.clone(),
        dial_timeout: config.dial_timeout,
    };
    let mut service =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, proxy, "roost gateway");
    if let Some(tls) = &config.tls {
        let utf8 = |p: &PathBuf| {
            p.to_str()
                .map(str::to_owned)
                .ok_or_else(|| BuildError::NonUtf8Path(p.clone()))
        };
        let mut settings =
            TlsSettings::intermediate(&utf8(&tls.cert)?, &utf8(&tls.key)?).map_err(|source| {
                BuildError::Tls {
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                    source,
                }
            })?;
        settings.enable_h2();
        service.add_tls_with_settings(&tls.addr.to_string(), None, settings);
    }
    if let Some(addr) = config.listen_http {
        service.add_tcp(&addr.to_string());
    }
    server.add_service(service);
    if let Some(addr) = config.listen_metrics {
        let mut metrics_service = Service::new(
            "roost gateway metrics".into(),
            HttpServer::new_app(MetricsApp(metrics.clone())),
        );
        metrics_service.add_tcp(&addr.to_string());
        server.add_service(metrics_service);
    }
    server.add_service(background_service("tunnel bridge", bridge));
    server.add_service(background_service(
        "route sync",
        match config.redis_route_events.clone() {
            Some(redis) => {
                RouteSync::new(control, routes.clone(), metrics.clone()).with_redis(redis)
            }
            None => RouteSync::new(control, routes.clone(), metrics.clone()),
        },
    ));
    server.add_service(background_service("housekeeping", Housekeeping(limits)));
    Ok((
        GatewayServer { server, bridge_dir },
        GatewayParts {
            metrics,
            routes,
            bridge_socket,
        },
    ))
}

struct StopSignal(tokio::sync::watch::Receiver<bool>);

#[async_trait]
impl pingora::server::ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        let mut stop = self.0.clone();
        // A dropped sender also means stop.
        let _ = stop.wait_for(|stop| *stop).await;
        pingora::server::ShutdownSignal::FastShutdown
    }
}

/// Trims idle rate-limit entries once a minute.
struct Housekeeping(Arc<RateLimits>);

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => self.0.housekeeping(),
                _ = shutdown.changed() => return,
            }
        }
    }
}
