//! Gateway throughput: the same HTTP backend reached directly, through nginx as a reverse
//! proxy, and through the Roost gateway + QUIC tunnel (a real `TunnelHub` and a real worker
//! `TunnelClient` with mutual TLS, all on loopback). The same keep-alive load generator drives
//! all three in interleaved rounds; requests/s is the median over rounds, latency quantiles
//! are over every request of a target.
//!
//! Each proxied gateway request opens a fresh QUIC stream through the tunnel (Pingora does not
//! pool connections it cannot see a file descriptor for), while nginx keeps a pool of
//! keep-alive connections to the backend: that is the configuration each is deployed with.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use roost_gateway::routes::{
    ControlApi, ControlError, EventStream, ResumeOutcome, Route, RouteEvent, RouteState,
};
use roost_gateway::server::GatewayConfig;
use roost_gateway::tunnel::{TunnelHub, TunnelHubConfig};
use roost_proto::ids::SandboxId;
use roost_worker::tunnel::{GatewayTarget, TcpSplicer, TunnelClient, TunnelClientConfig};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::stats;

const DOMAIN: &str = "bench.roost.test";
const SANDBOX: &str = "cl-gatewaybench";
const WORKER: &str = "wrk_bench";

/// What to measure.
#[derive(Debug, Clone)]
pub struct GatewayBench {
    /// Concurrent keep-alive client connections.
    pub connections: usize,
    /// Length of one measurement of one target.
    pub round: Duration,
    /// Interleaved rounds (direct, nginx, gateway each once per round).
    pub rounds: u32,
    /// Worker threads of the gateway and worker processes of nginx.
    pub threads: usize,
    /// Size of the backend's response body.
    pub body_bytes: usize,
    /// The nginx binary.
    pub nginx: PathBuf,
}

/// Figures of one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetFigures {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    pub direct: TargetFigures,
    pub nginx: TargetFigures,
    pub gateway: TargetFigures,
    pub connections: usize,
    pub rounds: u32,
    pub round_secs: f64,
    pub threads: usize,
    pub body_bytes: usize,
}

impl GatewayBench {
    pub async fn run(&self) -> Result<GatewayReport> {
        let backend = backend(self.body_bytes).await?;
        let nginx = Nginx::start(&self.nginx, backend, self.threads)?;
        let tunnel = TunnelPair::start().await?;
        let gateway = RunningGateway::start(self.threads, tunnel.hub.clone())?;
        let sandbox_host = format!("{}-{SANDBOX}.{DOMAIN}", backend.port());
        let targets: [(&str, SocketAddr, String); 3] = [
            ("direct", backend, "backend".to_owned()),
            ("nginx", nginx.addr, "backend".to_owned()),
            ("gateway", gateway.addr, sandbox_host),
        ];
        for (name, addr, host) in &targets {
            wait_listening(*addr).await?;
            // Warm-up: connections, caches, the route look-up.
            load(*addr, host, self.connections, Duration::from_millis(500))
                .await
                .with_context(|| format!("warming up {name}"))?;
        }
        let mut rps: [Vec<f64>; 3] = Default::default();
        let mut latencies: [Vec<f64>; 3] = Default::default();
        for round in 1..=self.rounds {
            for (i, (name, addr, host)) in targets.iter().enumerate() {
                let sample = load(*addr, host, self.connections, self.round)
                    .await
                    .with_context(|| format!("round {round}, {name}"))?;
                let round_rps = sample.latencies_ms.len() as f64 / sample.elapsed.as_secs_f64();
                eprintln!(
                    "round {round}/{}: {name:>7} {round_rps:>8.0} req/s",
                    self.rounds
                );
                rps[i].push(round_rps);
                latencies[i].extend(sample.latencies_ms);
            }
        }
        let figures = |i: usize| -> Result<TargetFigures> {
            Ok(TargetFigures {
                rps: stats::median(&rps[i]).context("no rounds")?,
                p50_ms: stats::quantile(&latencies[i], 0.5).context("no requests")?,
                p99_ms: stats::quantile(&latencies[i], 0.99).context("no requests")?,
                requests: latencies[i].len(),
            })
        };
        let report = GatewayReport {
            direct: figures(0)?,
            nginx: figures(1)?,
            gateway: figures(2)?,
            connections: self.connections,
            rounds: self.rounds,
            round_secs: self.round.as_secs_f64(),
            threads: self.threads,
            body_bytes: self.body_bytes,
        };
        drop(gateway);
        tunnel.stop().await;
        nginx.stop()?;
        Ok(report)
    }
}

// ------------------------------------------------------------------ load generator

struct Sample {
    latencies_ms: Vec<f64>,
    elapsed: Duration,
}

/// `connections` keep-alive HTTP/1.1 connections each sending GET / back to back for `length`.
async fn load(
    addr: SocketAddr,
    host: &str,
    connections: usize,
    length: Duration,
) -> Result<Sample> {
    let started = Instant::now();
    let deadline = started + length;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let host = host.to_owned();
        tasks.push(tokio::spawn(async move {
            one_connection(addr, &host, deadline).await
        }));
    }
    let mut latencies_ms = Vec::new();
    for task in tasks {
        latencies_ms.extend(task.await.context("load task panicked")??);
    }
    Ok(Sample {
        latencies_ms,
        elapsed: started.elapsed(),
    })
}

async fn one_connection(addr: SocketAddr, host: &str, deadline: Instant) -> Result<Vec<f64>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let request = Request::builder()
            .uri("/")
            .header("host", host)
            .body(Empty::<Bytes>::new())?;
        let sent = Instant::now();
        let response = sender
            .send_request(request)
            .await
            .context("request failed")?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .context("reading the body")?;
        if status != 200 {
            bail!("{addr} answered {status}");
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(latencies)
}

async fn wait_listening(addr: SocketAddr) -> Result<()> {
    for _ in 0..500 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("nothing listens on {addr} after 5 s")
}

fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

// ------------------------------------------------------------------ backend

/// An HTTP/1.1 server answering every request with `body_bytes` bytes.
async fn backend(body_bytes: usize) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let body = Bytes::from(vec![b'r'; body_bytes]);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

// ------------------------------------------------------------------ nginx

struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(binary: &Path, backend: SocketAddr, workers: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let addr = free_port()?;
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nworker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 upstream backend {{ server {backend}; keepalive 256; keepalive_requests 100000000; }}\n\
             \x20 server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://backend;\n\
             \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (install the Debian package nginx)",
                    binary.display()
                )
            })?;
        Ok(Self {
            child,
            addr,
            _dir: dir,
        })
    }

    /// SIGTERM to the master (it stops its workers), then reap it.
    fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------------ tunnel and gateway

/// A hub and one worker dialled into it, with mutual TLS from a throwaway PKI; the worker's
/// only sandbox is at 127.0.0.1.
struct TunnelPair {
    hub: TunnelHub,
    worker: TunnelClient,
}

impl TunnelPair {
    async fn start() -> Result<Self> {
        let gateway_ca = Ca::new("bench gateway CA")?;
        let worker_ca = Ca::new("bench worker CA")?;
        let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (server_cert, server_key) = gateway_ca.issue(server)?;
        let mut worker = CertificateParams::default();
        worker.distinguished_name.push(DnType::CommonName, WORKER);
        worker.subject_alt_names = vec![SanType::URI(
            format!("urn:roost:worker:{WORKER}").try_into()?,
        )];
        worker.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        worker.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (worker_cert, worker_key) = worker_ca.issue(worker)?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
        let hub = TunnelHub::bind(TunnelHubConfig::new(
            "127.0.0.1:0".parse()?,
            server_cert,
            server_key,
            worker_ca.pem(),
            secret,
        ))?;
        let splicer = Arc::new(TcpSplicer::new());
        splicer.insert(SANDBOX.parse()?, IpAddr::from([127, 0, 0, 1]));
        let config = TunnelClientConfig::new(
            vec![GatewayTarget {
                addr: hub.local_addr()?,
                server_name: "localhost".into(),
            }],
            gateway_ca.pem(),
            worker_cert,
            worker_key,
        );
        let worker = TunnelClient::start(config, splicer)?;
        if !hub.wait_for_worker(WORKER, Duration::from_secs(10)).await {
            bail!("the benchmark's worker did not connect to the tunnel hub");
        }
        Ok(Self { hub, worker })
    }

    async fn stop(self) {
        self.worker.shutdown().await;
        self.hub.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.hub.wait_idle()).await;
    }
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Self {
            cert: params.self_signed(&key)?,
            key,
        })
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// (certificate PEM, key PEM)
    fn issue(&self, params: CertificateParams) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Control as the gateway sees it: one running sandbox on the bench worker.
struct StaticControl {
    route: Route,
    subscribers: Mutex<Vec<mpsc::Sender<RouteEvent>>>,
}

#[async_trait]
impl ControlApi for StaticControl {
    async fn route(&self, sandbox: &SandboxId) -> Result<Option<Route>, ControlError> {
        Ok((sandbox.as_str() == self.route.sandbox_id).then(|| self.route.clone()))
    }
    async fn resume(&self, _: &SandboxId, _: Duration) -> Result<ResumeOutcome, ControlError> {
        Ok(ResumeOutcome::NotFound)
    }
    async fn events(&self) -> Result<EventStream, ControlError> {
        // Kept open (the sender is held) so the gateway trusts its route cache.
        let (tx, rx) = mpsc::channel(1);
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        Ok(rx)
    }
}

struct RunningGateway {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningGateway {
    fn start(threads: usize, hub: TunnelHub) -> Result<Self> {
        let addr = free_port()?;
        let config = GatewayConfig {
            domain: DOMAIN.into(),
            tls: None,
            listen_http: Some(addr),
            listen_metrics: None,
            // Only sandbox traffic is measured; nothing is sent to control's address.
            control_addr: "127.0.0.1:9".parse()?,
            threads,
            grace_period: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(1),
            per_ip_limit: None,
            per_key_limit: None,
            auto_resume: false,
            resume_timeout: Duration::from_secs(1),
            route_ttl: Duration::from_secs(3600),
            dial_timeout: Duration::from_secs(10),
            redis_route_events: None,
        };
        let control = Arc::new(StaticControl {
            route: Route {
                sandbox_id: SANDBOX.into(),
                team_id: "bench".into(),
                state: RouteState::Running,
                worker_id: Some(WORKER.into()),
                envd_access_token_sha256: None,
                public: true,
                traffic_access_token_sha256: None,
            },
            subscribers: Mutex::new(Vec::new()),
        });
        let (server, _parts) = roost_gateway::server::build(&config, Arc::new(hub), control)?;
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("gateway".into())
            .spawn(move || server.run_until_stopped(stop_rx))?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
