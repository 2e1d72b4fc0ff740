//! `roost serve worker`: the host agent. It registers with control once (a registration token
//! and a CSR over REST; the issued certificate and key are kept in the data directory, 0600,
//! so a restart reuses them), joins control's QUIC channel and answers its operations with the
//! sandbox manager (`roost_worker::manager`), re-joining with bounded backoff whenever the
//! connection ends. With `--gateway` it also holds a tunnel to each gateway and splices their
//! streams into the sandboxes' ports. SIGTERM/SIGINT stop every running VM and leave nothing
//! in the runtime root; paused sandboxes stay in the data directory and are reported to
//! control again at the next start.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use roost_control::workers::client::{ClientError, Handler, Identity, Session, Status};
use roost_images::{ArtefactIndex, Cache};
use roost_proto::control::{Capacity, Hello, Operation, Outcome, PROTOCOL_VERSION, WorkerError};
use roost_worker::manager::{
    HandleBackend, ManagerConfig, PoolPlan, PooledBackend, SandboxManager, SandboxSplicer,
};
use roost_worker::template::{self, TemplateName};
use roost_worker::tunnel::{GatewayTarget, TunnelClient, TunnelClientConfig};
use roost_worker::vm_handle::{SnapshotKind, default_runtime_root};
use serde::{Deserialize, Serialize};

use crate::cmd_sandbox::SeccompArg;
use crate::cmd_serve::parse_duration;

/// vCPUs offered per host CPU by default.
const VCPU_OVERCOMMIT: u32 = 4;

/// The file in the data directory that holds the worker's identity.
pub const CREDENTIALS_FILE: &str = "worker-credentials.json";

/// Run the worker host agent.
#[derive(clap::Args, Debug)]
pub struct ServeWorkerArgs {
    /// Control's REST API, for registration (e.g. http://127.0.0.1:3000).
    #[arg(long, value_name = "URL")]
    control_url: Option<String>,
    /// One-time registration token from `POST /v1/admin/workers/registration-tokens`; needed
    /// only until the credentials are in the data directory.
    #[arg(long, env = "ROOST_WORKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data directory: credentials, paused sandboxes, snapshot templates
    /// [default: $ROOST_DATA_DIR/worker, or $XDG_DATA_HOME/roost/worker, ~/.local/share/roost/worker].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Where running VMs' runtime directories go; emptied at start-up
    /// [default: the `roost sandbox run` runtime root + /worker].
    #[arg(long, value_name = "DIR")]
    runtime_root: Option<PathBuf>,
    /// Built-in template to offer (repeatable): base, code-interpreter. Built ones only
    /// (`roost templates build`).
    #[arg(long = "template", value_name = "NAME", default_values = ["base"])]
    templates: Vec<TemplateName>,
    /// Also offer the snapshot directory DIR (holding `vm.state`) as template ID (repeatable).
    #[arg(long = "template-dir", value_name = "ID=DIR", value_parser = parse_template_dir)]
    template_dirs: Vec<(String, PathBuf)>,
    /// vCPUs offered [default: 4 per host CPU: sandboxes mostly idle, so vCPUs are
    /// overcommitted; their cgroups bound what each may use].
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory offered in MiB [default: the host's memory].
    #[arg(long, value_name = "MiB")]
    memory_mib: Option<u64>,
    /// Disk offered in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 100 * 1024)]
    disk_mib: u64,
    /// Most sandboxes (running and paused) held at once.
    #[arg(long, default_value_t = 64)]
    max_sandboxes: u32,
    /// How a pause saves memory: only what changed since the snapshot the VM came from
    /// (diff), or everything (full).
    #[arg(long, value_enum, default_value_t = PauseArg::Diff)]
    pause_snapshot: PauseArg,
    /// Warm clones kept restored per built-in template: a create of that template takes one
    /// and only hands it its identity (0: every create restores).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pool: usize,
    /// Guest memory all warm clones may hold together, split evenly between templates.
    #[arg(long, default_value_t = 2048, value_name = "MiB")]
    pool_memory_mib: u64,
    /// Serve the worker's Prometheus metrics (warm pools) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds a restored agent may take to take its identity.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    ready_timeout: u64,
    /// The VMMs' seccomp mode.
    #[arg(long, value_enum, default_value_t = SeccompArg::Enforce)]
    seccomp: SeccompArg,
    /// Put each VMM in its own cgroup under /sys/fs/cgroup/NAME (cgroup v2, needs root).
    #[arg(long, value_name = "NAME")]
    cgroup_parent: Option<String>,
    /// Longest wait between attempts to (re)join control (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    max_backoff: Duration,
    /// A gateway's tunnel endpoint to dial (HOST:PORT, UDP; repeatable).
    #[arg(long = "gateway", value_name = "ADDR")]
    gateways: Vec<String>,
    /// The name the gateways' certificates carry.
    #[arg(long, default_value = "localhost", requires = "gateways")]
    gateway_server_name: String,
    /// CA certificate (PEM) that signs the gateways' certificates.
    #[arg(long, value_name = "FILE", requires = "gateways")]
    gateway_ca: Option<PathBuf>,
    #[command(flatten)]
    net: crate::worker_net::WorkerNetArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum PauseArg {
    Diff,
    Full,
}

/// What registration gave this worker, kept in [`CREDENTIALS_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Credentials {
    worker_id: String,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    server_name: String,
    /// HOST:PORT of control's QUIC channel, resolved at each join.
    channel_address: String,
}

impl Credentials {
    fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a worker credentials file", path.display()))
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the file with mode 0600 through a temporary file and a rename.
    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(&serde_json::to_vec_pretty(self)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    async fn identity(&self) -> anyhow::Result<Identity> {
        let control_addr = resolve(&self.channel_address).await?;
        Ok(Identity {
            worker_id: self.worker_id.clone(),
            ca_pem: self.ca_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            server_name: self.server_name.clone(),
            control_addr,
        })
    }
}

async fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("cannot resolve control's channel address {address}"))?
        .next()
        .with_context(|| format!("control's channel address {address} resolves to nothing"))
}

/// The registration exchange: a token and a CSR for a certificate.
async fn register(control_url: &str, token: &str) -> anyhow::Result<Credentials> {
    let (key_pem, csr) =
        roost_control::pki::new_key_and_csr().context("cannot make a key and a CSR")?;
    let url = format!("{}/v1/workers/register", control_url.trim_end_matches('/'));
    let body = serde_json::json!({ "token": token, "csr": csr }).to_string();
    let request = hyper::Request::post(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .with_context(|| format!("invalid control URL {control_url}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .context("control did not answer the registration within 30 s")?
        .with_context(|| format!("cannot reach control at {url}"))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .context("cannot read control's answer")?
        .to_bytes();
    if status != hyper::StatusCode::CREATED {
        bail!(
            "control refused the registration ({status}): {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let reply: serde_json::Value =
        serde_json::from_slice(&bytes).context("control's registration answer is not JSON")?;
    let field = |name: &str| -> anyhow::Result<String> {
        reply[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("control's registration answer lacks {name}"))
    };
    Ok(Credentials {
        worker_id: field("workerId")?,
        ca_pem: field("caCertificatePem")?,
        cert_pem: field("certificatePem")?,
        key_pem,
        server_name: field("serverName")?,
        channel_address: field("channelAddress")?,
    })
}

/// The worker's answers to control: the manager's operations.
struct WorkerHandler {
    manager: Arc<SandboxManager<PooledBackend>>,
}

#[async_trait]
impl Handler for WorkerHandler {
    async fn handle(&self, operation: Operation) -> Result<Outcome, WorkerError> {
        let manager = &self.manager;
        let result = match operation {
            Operation::Create(spec) => manager.create(&spec).await.map(|()| Outcome::Created),
            Operation::Kill { sandbox_id } => {
                manager.kill(&sandbox_id).await.map(|()| Outcome::Killed)
            }
            Operation::Pause { sandbox_id } => {
                manager.pause(&sandbox_id).await.map(|()| Outcome::Paused)
            }
            Operation::Resume(spec) => manager.resume(&spec).await.map(|()| Outcome::Resumed),
            Operation::Snapshot {
                sandbox_id,
                snapshot_id,
            } => manager
                .snapshot(&sandbox_id, &snapshot_id)
                .await
                .map(|size_bytes| Outcome::Snapshotted { size_bytes }),
            Operation::Metrics { sandbox_id } => manager
                .metrics(&sandbox_id)
                .map(|samples| Outcome::Metrics { samples }),
            Operation::DeleteTemplate { template_id } => manager
                .delete_template(&template_id)
                .map(|()| Outcome::TemplateDeleted),
        };
        result.map_err(|e| {
            let error = WorkerError::from(e);
            tracing::warn!(kind = ?error.kind, "operation failed: {}", error.message);
            error
        })
    }

    fn status(&self) -> Status {
        Status {
            usage: self.manager.usage(),
            templates: self.manager.templates(),
            sandboxes: self.manager.reports(),
        }
    }
}

fn parse_template_dir(text: &str) -> Result<(String, PathBuf), String> {
    let (id, dir) = text
        .split_once('=')
        .ok_or_else(|| format!("expected ID=DIR, got {text:?}"))?;
    if !roost_worker::manager::store::valid_id(id) {
        return Err(format!(
            "template id {id:?}: use 1-64 letters, digits, '-' and '_'"
        ));
    }
    let dir = std::path::absolute(dir).map_err(|e| format!("{dir}: {e}"))?;
    Ok((id.to_owned(), dir))
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    let root = match std::env::var_os("ROOST_DATA_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => crate::cmd_serve::data_dir(None)?,
    };
    Ok(root.join("worker"))
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// The built templates among `names` (with a network device or without), by id; a missing one
/// is reported and skipped.
fn find_templates(names: &[TemplateName], network: bool) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let cache = match Cache::from_env() {
        Ok(cache) => cache,
        Err(e) => {
            eprintln!("roost worker: no artefact cache ({e}); offering no built-in template");
            return found;
        }
    };
    let index = ArtefactIndex::new(&cache);
    for &name in names {
        let flag = if network { " --network" } else { "" };
        match template::lookup(&index, name, network) {
            Ok(t) => {
                found.insert(name.as_str().to_owned(), t.snapshot_dir);
            }
            Err(e) => eprintln!(
                "roost worker: template {name} is not built ({e}); run `roost templates build --image {name}{flag}`"
            ),
        }
    }
    found
}

pub fn run(args: ServeWorkerArgs) -> anyhow::Result<i32> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: ServeWorkerArgs) -> anyhow::Result<i32> {
    let shutdown = crate::cmd_serve::shutdown_signal().await?;
    let data_dir = match args.data_dir.clone() {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let creds_path = data_dir.join(CREDENTIALS_FILE);
    let creds = match Credentials::load(&creds_path)? {
        Some(creds) => creds,
        None => {
            let (Some(url), Some(token)) = (&args.control_url, &args.token) else {
                bail!(
                    "no credentials in {} yet: give --control-url and --token (or \
                     ROOST_WORKER_TOKEN) to register",
                    data_dir.display()
                );
            };
            let creds = register(url, token).await?;
            creds.save(&creds_path)?;
            println!("roost worker: registered as {}", creds.worker_id);
            creds
        }
    };

    let runtime_root = args
        .runtime_root
        .clone()
        .unwrap_or_else(|| default_runtime_root().join("worker"));
    let mut config = ManagerConfig::new(&data_dir, runtime_root);
    let named: Vec<TemplateName> = args
        .templates
        .iter()
        .copied()
        .filter(|name| !args.template_dirs.iter().any(|(id, _)| id == name.as_str()))
        .collect();
    config.templates = find_templates(&named, args.net.net);
    for (id, dir) in &args.template_dirs {
        let state = dir.join(roost_worker::vm_handle::SNAPSHOT_STATE_FILE);
        if !state.is_file() {
            bail!(
                "--template-dir {id}={}: no snapshot there (no {})",
                dir.display(),
                state.display()
            );
        }
        config.templates.insert(id.clone(), dir.clone());
    }
    config.capacity = Capacity {
        vcpus: args.vcpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok())
                .unwrap_or(1)
                .saturating_mul(VCPU_OVERCOMMIT)
        }),
        memory_mib: args.memory_mib.unwrap_or_else(host_memory_mib),
        disk_mib: args.disk_mib,
        max_sandboxes: args.max_sandboxes,
    };
    config.pause_snapshot = match args.pause_snapshot {
        PauseArg::Diff => SnapshotKind::Diff,
        PauseArg::Full => SnapshotKind::Full,
    };
    let mut restorer = HandleBackend::new();
    restorer.ready_timeout = Duration::from_secs(args.ready_timeout.max(1));
    restorer.seccomp = args.seccomp.mode();
    if args.net.net {
        let mut control = vec![creds.channel_address.clone()];
        control.extend(
            args.control_url
                .as_deref()
                .and_then(crate::worker_net::url_host_port),
        );
        restorer.net = Some(crate::worker_net::start(&args.net, &control).await?);
    } else {
        tracing::info!("no --net: sandboxes get no network device");
    }
    let net = restorer.net.clone();
    let backend = PooledBackend::new(restorer);
    let pools = backend.clone();
    let pool_plan = PoolPlan {
        per_template: args.pool,
        memory_budget_mib: args.pool_memory_mib,
        runtime_root: config.runtime_root.clone(),
    };
    let pooled_templates = config.templates.clone();
    let capacity = config.capacity;
    let splicer = Arc::new(SandboxSplicer::new());
    let mut manager = SandboxManager::open(config, backend)
        .context("cannot open the sandbox manager")?
        .with_routes(splicer.clone());
    if let Some(parent) = &args.cgroup_parent {
        let tree = roost_worker::cgroup::CgroupTree::open(Path::new("/sys/fs/cgroup"), parent)
            .context("cannot set up sandbox cgroups")?;
        manager = manager.with_cgroups(tree)?;
    }
    let manager = Arc::new(manager);
    // After the manager emptied the runtime root, where the warm clones live.
    pools
        .start_pools(&pooled_templates, &pool_plan)
        .context("cannot start the warm pools")?;
    let metrics = match args.metrics_addr {
        Some(addr) => Some(serve_metrics(addr, pools.clone()).await?),
        None => None,
    };

    let tunnel = match args.gateways.is_empty() {
        true => None,
        false => Some(start_tunnel(&args, &creds, splicer).await?),
    };

    let outcome = join_loop(
        &creds,
        capacity,
        manager.clone(),
        args.max_backoff,
        shutdown,
    )
    .await;
    manager.shutdown().await;
    pools.shutdown_pools().await;
    if let Some(net) = net
        && let Err(e) = net.shutdown().await
    {
        eprintln!("roost worker: cannot remove the sandbox networks: {e:#}");
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Some(tunnel) = tunnel {
        tunnel.shutdown().await;
    }
    println!("roost worker: stopped");
    std::io::stdout().flush().ok();
    outcome.map(|()| 0)
}

async fn start_tunnel(
    args: &ServeWorkerArgs,
    creds: &Credentials,
    splicer: Arc<SandboxSplicer>,
) -> anyhow::Result<TunnelClient> {
    let mut gateways = Vec::new();
    for address in &args.gateways {
        gateways.push(GatewayTarget {
            addr: resolve(address).await?,
            server_name: args.gateway_server_name.clone(),
        });
    }
    let ca_pem = match &args.gateway_ca {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => {
            bail!("--gateway needs --gateway-ca (the CA that signs the gateways' certificates)")
        }
    };
    let config = TunnelClientConfig::new(
        gateways,
        ca_pem,
        creds.cert_pem.clone(),
        creds.key_pem.clone(),
    );
    TunnelClient::start(config, splicer).context("cannot start the gateway tunnels")
}

/// Joins control and stays joined until `shutdown`, re-joining with doubling backoff (1 s up
/// to `max_backoff`) whenever the connection ends or an attempt fails.
async fn join_loop(
    creds: &Credentials,
    capacity: Capacity,
    manager: Arc<SandboxManager<PooledBackend>>,
    max_backoff: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let handler: Arc<dyn Handler> = Arc::new(WorkerHandler {
        manager: manager.clone(),
    });
    let mut shutdown = std::pin::pin!(shutdown);
    let min_backoff = Duration::from_secs(1).min(max_backoff);
    let mut backoff = min_backoff;
    loop {
        let attempt = async {
            let identity = creds.identity().await?;
            let hello = Hello {
                protocol_version: PROTOCOL_VERSION,
                worker_id: creds.worker_id.clone(),
                worker_version: env!("CARGO_PKG_VERSION").to_owned(),
                capacity,
                templates: manager.templates(),
                usage: manager.usage(),
                sandboxes: manager.reports(),
            };
            let session = Session::join(&identity, hello, handler.clone()).await;
            anyhow::Ok((identity.control_addr, session))
        };
        let joined = tokio::select! {
            joined = attempt => joined,
            () = &mut shutdown => return Ok(()),
        };
        match joined {
            Ok((addr, Ok(session))) => {
                backoff = min_backoff;
                println!(
                    "roost worker: joined control at {addr} as {}; templates: {}",
                    creds.worker_id,
                    manager.templates().join(", ")
                );
                std::io::stdout().flush().ok();
                tokio::select! {
                    reason = session.closed() => {
                        tracing::warn!(%reason, "the control connection ended; re-joining");
                        println!("roost worker: lost control ({reason}); re-joining");
                        std::io::stdout().flush().ok();
                    }
                    () = &mut shutdown => {
                        session.leave().await;
                        return Ok(());
                    }
                }
            }
            Ok((addr, Err(ClientError::Rejected(reason)))) => {
                eprintln!("roost worker: control at {addr} rejected this worker: {reason}");
            }
            Ok((addr, Err(e))) => {
                eprintln!("roost worker: cannot join control at {addr}: {e:#}");
            }
            Err(e) => eprintln!("roost worker: cannot join control: {e:#}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = &mut shutdown => return Ok(()),
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// Serves `GET /metrics` (the warm pools in the Prometheus text format) on `addr`.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    pools: PooledBackend,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    println!(
        "roost worker: metrics on http://{}/metrics",
        listener.local_addr()?
    );
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let pools = pools.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    let response = if request.uri().path() == "/metrics" {
                        let text =
                            roost_worker::pool::PoolStats::render_prometheus(&pools.pool_stats());
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(text)))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(
                                br#"{"code":404,"message":"only /metrics is served here"}"#,
                            )))
                    };
                    async move { response }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection");
                }
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn credentials_are_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CREDENTIALS_FILE);
        assert!(Credentials::load(&path).unwrap().is_none());
        let creds = Credentials {
            worker_id: "wrk_1".into(),
            ca_pem: "CA".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
            server_name: "control.roost".into(),
            channel_address: "127.0.0.1:7443".into(),
        };
        creds.save(&path).unwrap();
        creds.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = Credentials::load(&path).unwrap().unwrap();
        assert_eq!(back.worker_id, "wrk_1");
        assert_eq!(back.key_pem, "KEY");
        std::fs::write(&path, b"{").unwrap();
        assert!(Credentials::load(&path).is_err());
    }

    #[test]
    fn template_dirs_parse() {
        let (id, dir) = parse_template_dir("mine=/snap/x").unwrap();
        assert_eq!((id.as_str(), dir), ("mine", PathBuf::from("/snap/x")));
        assert!(parse_template_dir("mine").is_err());
        assert!(parse_template_dir("../x=/d").is_err());
    }

    #[test]
    fn host_memory_is_read() {
        assert!(host_memory_mib() > 0);
    }
}
