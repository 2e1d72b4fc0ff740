//! `roost-bench control`: the control plane alone, over real HTTP on loopback, with workers
//! that answer every request at once, so the figures are control's own cost (routing, auth,
//! rate limits, the database, the state machine, and placement):
//! - placement `instant`: the in-process `InstantWorker` (no channel at all);
//! - placement `quic`: one registered worker on the real QUIC + mTLS control channel over
//!   loopback (`workers::client::Session` with a handler that keeps a map), which adds the
//!   channel's round trip to every create.
//!
//! For each database engine (SQLite in a temporary directory, and a fresh PostgreSQL database
//! that is dropped afterwards):
//! - **create latency**: sequential `POST /v2/sandboxes`, one at a time (p50/p95);
//! - **list throughput**: `GET /v2/sandboxes` (one page of the sandboxes just created) from
//!   `concurrency` client tasks for a fixed time; requests per second and p50 latency.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use roost_control::api::v1::workers::WorkerRegistration;
use roost_control::api::{self, AppState, Config};
use roost_control::auth::password::HashCost;
use roost_control::lifecycle::Sandboxes;
use roost_control::pki::{self, ControlCa};
use roost_control::placement::instant::InstantWorker;
use roost_control::ratelimit::{Budget, Limits};
use roost_control::store::{Db, worker_tokens};
use roost_control::workers::client::{Handler, Identity, Session, Status};
use roost_control::workers::{ChannelConfig, WorkerChannel};
use roost_proto::control::{
    Capacity, Hello, Operation, Outcome, PROTOCOL_VERSION, SandboxReport, Usage, WorkerError,
    WorkerSandboxState,
};
use serde::Serialize;
use sqlx::Connection;

use crate::stats::{self, Summary};

/// How sandboxes are placed during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementKind {
    Instant,
    Quic,
}

impl PlacementKind {
    fn name(self) -> &'static str {
        match self {
            Self::Instant => "instant",
            Self::Quic => "quic",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ControlBench {
    /// Placements to measure, each on every engine.
    pub placements: Vec<PlacementKind>,
    /// Sequential creates per engine (also the number of sandboxes the list sees).
    pub creates: u32,
    /// Concurrent clients of the list phase.
    pub concurrency: u32,
    /// Length of the list phase.
    pub list_for: Duration,
    /// Page size of each list request.
    pub page: u32,
    /// Admin URL of a PostgreSQL server whose role may create databases; `None` skips it.
    pub postgres_url: Option<String>,
}

/// Figures of one engine.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub engine: &'static str,
    pub placement: &'static str,
    pub create_ms: Summary,
    pub list_requests: u64,
    pub list_seconds: f64,
    pub list_rps: f64,
    pub list_ms: Summary,
    pub list_concurrency: u32,
    pub list_page: u32,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Target {
    client: HttpClient,
    base: String,
}

impl Target {
    async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Option<(&str, &str)>,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some((name, value)) = auth {
            req = req.header(name, value);
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let response = self.client.request(req.body(body)?).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

fn roomy_config() -> Config {
    let mut config = Config::new(b"roost-bench-session-secret-0123456789".to_vec());
    // Benchmarks measure the API, not argon2 (only signup and login hash passwords).
    config.password_cost = HashCost::TESTING;
    let n = NonZeroU32::new(1_000_000).unwrap_or(NonZeroU32::MAX);
    let budget = Budget {
        per_second: n,
        burst: n,
    };
    config.limits = Limits {
        per_credential: budget,
        per_team: budget,
    };
    config
}

async fn json_field(bytes: &Bytes, field: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    v[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("response has no {field}: {v}"))
}

impl ControlBench {
    /// Runs every placement on every engine (each on a fresh database) and returns the figures.
    pub async fn run(&self) -> anyhow::Result<Vec<EngineReport>> {
        let mut reports = Vec::new();
        for &placement in &self.placements {
            let dir = tempfile::tempdir()?;
            let db = Db::open_data_dir(dir.path()).await?;
            reports.push(self.run_engine("sqlite", placement, db).await?);
            if let Some(admin_url) = &self.postgres_url {
                let scratch = ScratchPostgres::create(admin_url).await?;
                let outcome = async {
                    let db = Db::connect(&scratch.url).await?;
                    let report = self.run_engine("postgres", placement, db.clone()).await;
                    db.close().await;
                    report
                }
                .await;
                scratch.drop_database().await?;
                reports.push(outcome?);
            }
        }
        Ok(reports)
    }

    async fn run_engine(
        &self,
        engine: &'static str,
        placement: PlacementKind,
        db: Db,
    ) -> anyhow::Result<EngineReport> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = Arc::new(Target {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        });
        match placement {
            PlacementKind::Instant => {
                let worker = Arc::new(InstantWorker::register(&db).await?);
                let state = AppState::new(Sandboxes::new(db, worker), roomy_config());
                let server = tokio::spawn(api::serve(listener, state));
                let result = self.measure(engine, placement, &target).await;
                server.abort();
                result
            }
            PlacementKind::Quic => {
                let ca = Arc::new(ControlCa::generate()?);
                let channel = WorkerChannel::start(
                    db.clone(),
                    &ca,
                    ChannelConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
                )
                .await?;
                let registration = WorkerRegistration {
                    ca,
                    server_name: channel.config().server_name.clone(),
                    channel_address: channel.local_addr()?.to_string(),
                };
                let state = AppState::with_workers(
                    Sandboxes::new(db.clone(), Arc::new(channel.placement())),
                    roomy_config(),
                    Some(registration),
                );
                let server = tokio::spawn(api::serve(listener, state));
                let result = async {
                    let session = join_bench_worker(&db, &target).await?;
                    let result = self.measure(engine, placement, &target).await;
                    session.leave().await;
                    result
                }
                .await;
                server.abort();
                channel.close();
                result
            }
        }
    }

    async fn measure(
        &self,
        engine: &'static str,
        placement: PlacementKind,
        t: &Arc<Target>,
    ) -> anyhow::Result<EngineReport> {
        let (status, body) = t
            .call(
                Method::POST,
                "/v1/auth/signup",
                None,
                Some(
                    serde_json::json!({"email": "bench@example.com", "password": "bench-password"}),
                ),
            )
            .await?;
        if status != StatusCode::CREATED {
            bail!("signup: {status} {}", String::from_utf8_lossy(&body));
        }
        let token = json_field(&body, "token").await?;
        let team = json_field(&body, "teamId").await?;
        let bearer = format!("Bearer {token}");
        let (status, body) = t
            .call(
                Method::POST,
                &format!("/v1/teams/{team}/api-keys"),
                Some(("authorization", &bearer)),
                Some(serde_json::json!({"name": "bench"})),
            )
            .await?;
        if status != StatusCode::CREATED {
            bail!("api key: {status} {}", String::from_utf8_lossy(&body));
        }
        let key = json_field(&body, "key").await?;

        let mut create_ms = Vec::new();
        for i in 0..self.creates {
            let body = serde_json::json!({
                "templateID": "base",
                "timeout": 3600,
                "metadata": {"bench": "control", "i": i.to_string()},
            });
            let start = Instant::now();
            let (status, bytes) = t
                .call(
                    Method::POST,
                    "/v2/sandboxes",
                    Some(("x-api-key", &key)),
                    Some(body),
                )
                .await?;
            let elapsed = start.elapsed();
            if status != StatusCode::CREATED {
                bail!("create: {status} {}", String::from_utf8_lossy(&bytes));
            }
            create_ms.push(elapsed.as_secs_f64() * 1000.0);
        }
        eprintln!(
            "{engine}/{}: {} creates done",
            placement.name(),
            self.creates
        );

        let path = format!("/v2/sandboxes?limit={}", self.page);
        let deadline = Instant::now() + self.list_for;
        let started = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..self.concurrency {
            let (t, key, path) = (t.clone(), key.clone(), path.clone());
            clients.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    let (status, bytes) = t
                        .call(Method::GET, &path, Some(("x-api-key", &key)), None)
                        .await?;
                    if status != StatusCode::OK {
                        bail!("list: {status} {}", String::from_utf8_lossy(&bytes));
                    }
                    samples.push(start.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(samples)
            }));
        }
        let mut list_ms = Vec::new();
        for c in clients {
            list_ms.extend(c.await??);
        }
        let seconds = started.elapsed().as_secs_f64();
        let requests = u64::try_from(list_ms.len())?;
        eprintln!(
            "{engine}/{}: {requests} lists in {seconds:.1} s",
            placement.name()
        );
        Ok(EngineReport {
            engine,
            placement: placement.name(),
            create_ms: stats::summarise(&create_ms).context("no create samples")?,
            list_requests: requests,
            list_seconds: seconds,
            list_rps: list_ms.len() as f64 / seconds,
            list_ms: stats::summarise(&list_ms).context("no list samples")?,
            list_concurrency: self.concurrency,
            list_page: self.page,
        })
    }
}

/// Registers a worker through the API (token from the store) and joins it to the channel.
async fn join_bench_worker(db: &Db, t: &Target) -> anyhow::Result<Session> {
    let (_, token) =
        worker_tokens::create(db, "bench", None, roost_control::store::now_ms() + 600_000).await?;
    let (key_pem, csr) = pki::new_key_and_csr()?;
    let (status, body) = t
        .call(
            Method::POST,
            "/v1/workers/register",
            None,
            Some(serde_json::json!({"token": token, "csr": csr})),
        )
        .await?;
    if status != StatusCode::CREATED {
        bail!(
            "worker registration: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let identity = Identity {
        worker_id: json_field(&body, "workerId").await?,
        ca_pem: json_field(&body, "caCertificatePem").await?,
        cert_pem: json_field(&body, "certificatePem").await?,
        key_pem,
        server_name: json_field(&body, "serverName").await?,
        control_addr: json_field(&body, "channelAddress").await?.parse()?,
    };
    let handler = Arc::new(BenchWorker::default());
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        worker_id: identity.worker_id.clone(),
        worker_version: "roost-bench".into(),
        capacity: Capacity {
            vcpus: u32::MAX / 2,
            memory_mib: u64::MAX / 2,
            disk_mib: u64::MAX / 2,
            max_sandboxes: u32::MAX / 2,
        },
        templates: vec!["base".into(), "code-interpreter-v1".into()],
        usage: Usage::default(),
        sandboxes: Vec::new(),
    };
    Ok(Session::join(&identity, hello, handler).await?)
}

/// A worker that holds sandbox ids in a set and answers at once.
#[derive(Debug, Default)]
struct BenchWorker {
    running: Mutex<HashSet<String>>,
}

#[async_trait::async_trait]
impl Handler for BenchWorker {
    async fn handle(&self, operation: Operation) -> Result<Outcome, WorkerError> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(match operation {
            Operation::Create(spec) => {
                running.insert(spec.sandbox_id);
                Outcome::Created
            }
            Operation::Kill { sandbox_id } => {
                running.remove(&sandbox_id);
                Outcome::Killed
            }
            Operation::Pause { .. } => Outcome::Paused,
            Operation::Resume(_) => Outcome::Resumed,
            Operation::Snapshot { .. } => Outcome::Snapshotted { size_bytes: 0 },
            Operation::Metrics { .. } => Outcome::Metrics {
                samples: Vec::new(),
            },
            Operation::DeleteTemplate { .. } => Outcome::TemplateDeleted,
        })
    }

    fn status(&self) -> Status {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        Status {
            usage: Usage {
                sandboxes: u32::try_from(running.len()).unwrap_or(u32::MAX),
                ..Usage::default()
            },
            templates: vec!["base".into(), "code-interpreter-v1".into()],
            sandboxes: running
                .iter()
                .map(|id| SandboxReport {
                    sandbox_id: id.clone(),
                    state: WorkerSandboxState::Running,
                })
                .collect(),
        }
    }
}

/// A PostgreSQL database made for one run and dropped after it.
struct ScratchPostgres {
    admin_url: String,
    name: String,
    url: String,
}

impl ScratchPostgres {
    async fn create(admin_url: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let name = roost_control::store::random_id("roost_bench_", 6)?;
        let mut admin = sqlx::AnyConnection::connect(admin_url)
            .await
            .context("connecting to PostgreSQL (--postgres-url)")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .context("creating the benchmark database")?;
        admin.close().await?;
        let (base, query) = admin_url
            .split_once('?')
            .map_or((admin_url, None), |(b, q)| (b, Some(q)));
        let prefix = base.rsplit_once('/').map_or(base, |(p, _)| p);
        let url = match query {
            Some(q) => format!("{prefix}/{name}?{q}"),
            None => format!("{prefix}/{name}"),
        };
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            url,
        })
    }

    async fn drop_database(&self) -> anyhow::Result<()> {
        let mut admin = sqlx::AnyConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}
