//! An in-process worker that speaks the real control channel (QUIC + mutual TLS on
//! 127.0.0.1) through `roost_control::workers::client`, and "runs" sandboxes in a map:
//! registration with a token and a CSR, hello, heartbeats, and answers to
//! create/kill/pause/resume/snapshot/metrics requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::http::{Method, StatusCode};
use roost_control::workers::client::{ClientError, Handler, Identity, Session, Status};
use roost_proto::control::{
    Capacity, CreateSandbox, ErrorKind, Hello, MetricSample, Operation, Outcome, PROTOCOL_VERSION,
    SandboxReport, Usage, WorkerError, WorkerSandboxState,
};
use serde_json::json;

use super::{Auth, Resp, TestApp};

/// What a registered worker holds to dial control.
#[derive(Debug, Clone)]
pub struct Creds {
    pub worker_id: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub server_name: String,
    pub addr: SocketAddr,
}

/// A fresh key (PEM) and a CSR for it (PEM).
pub fn csr() -> (String, String) {
    let (key, csr) = roost_control::pki::new_key_and_csr().unwrap();
    (csr, key)
}

/// Exchanges `token` for worker credentials; the response on failure.
pub async fn register(app: &TestApp, token: &str) -> Result<Creds, Resp> {
    let (csr, key) = csr();
    let r = app
        .call(
            Method::POST,
            "/v1/workers/register",
            Auth::None,
            Some(json!({"token": token, "csr": csr})),
        )
        .await;
    if r.status != StatusCode::CREATED {
        return Err(r);
    }
    Ok(Creds {
        worker_id: r.body["workerId"].as_str().unwrap().to_owned(),
        cert_pem: r.body["certificatePem"].as_str().unwrap().to_owned(),
        key_pem: key,
        ca_pem: r.body["caCertificatePem"].as_str().unwrap().to_owned(),
        server_name: r.body["serverName"].as_str().unwrap().to_owned(),
        addr: r.body["channelAddress"].as_str().unwrap().parse().unwrap(),
    })
}

/// What a test worker offers.
#[derive(Debug, Clone)]
pub struct Profile {
    pub capacity: Capacity,
    pub templates: Vec<String>,
}

impl Profile {
    /// Plenty of CPU, memory and disk; `max_sandboxes` slots; the given templates.
    pub fn new(max_sandboxes: u32, templates: &[&str]) -> Self {
        Self {
            capacity: Capacity {
                vcpus: 256,
                memory_mib: 1024 * 1024,
                disk_mib: 16 * 1024 * 1024,
                max_sandboxes,
            },
            templates: templates.iter().map(|t| (*t).to_owned()).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Held {
    state: WorkerSandboxState,
    vcpus: u32,
    memory_mib: u64,
    disk_mib: u64,
}

/// The sandboxes a test worker holds; survives reconnects (like a worker process that
/// restarts its control connection but not its VMs).
#[derive(Debug, Default)]
pub struct Book {
    sandboxes: Mutex<BTreeMap<String, Held>>,
    kills: Mutex<Vec<String>>,
    /// Carry out creates but never answer them (a worker whose answer is lost or too late).
    silent_creates: std::sync::atomic::AtomicBool,
    /// Snapshots taken here; offered as templates besides the profile's.
    snapshots: Mutex<std::collections::BTreeSet<String>>,
    /// Every create and resume request, as control sent it.
    specs: Mutex<Vec<Sent>>,
}

/// A create or resume request a test worker received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Create(CreateSandbox),
    Resume(CreateSandbox),
}

impl Book {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        self.sandboxes.lock().unwrap()
    }

    /// Ids of the held sandboxes with their states.
    pub fn held(&self) -> BTreeMap<String, WorkerSandboxState> {
        self.lock()
            .iter()
            .map(|(k, h)| (k.clone(), h.state))
            .collect()
    }

    pub fn holds(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Adds a sandbox control did not ask for (an orphan, for reconciliation tests).
    pub fn adopt(&self, id: &str, state: WorkerSandboxState) {
        self.lock().insert(
            id.to_owned(),
            Held {
                state,
                vcpus: 1,
                memory_mib: 1,
                disk_mib: 1,
            },
        );
    }

    /// Drops a sandbox without telling control (the VM died with the worker).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// From now on, start sandboxes but never answer the create request.
    pub fn answer_no_creates(&self) {
        self.silent_creates
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Snapshots this worker holds.
    pub fn snapshots(&self) -> Vec<String> {
        self.snapshots.lock().unwrap().iter().cloned().collect()
    }

    fn templates(&self, profile: &Profile) -> Vec<String> {
        let mut all = profile.templates.clone();
        all.extend(self.snapshots());
        all
    }

    /// Create and resume requests for sandbox `id`, in the order received.
    pub fn sent(&self, id: &str) -> Vec<Sent> {
        self.specs
            .lock()
            .unwrap()
            .iter()
            .filter(|s| match s {
                Sent::Create(spec) | Sent::Resume(spec) => spec.sandbox_id == id,
            })
            .cloned()
            .collect()
    }

    /// Sandboxes control told this worker to kill, in order.
    pub fn kills(&self) -> Vec<String> {
        self.kills.lock().unwrap().clone()
    }

    fn usage(&self) -> Usage {
        let map = self.lock();
        let mut u = Usage::default();
        for h in map.values() {
            u.sandboxes += 1;
            u.vcpus += h.vcpus;
            u.memory_mib += h.memory_mib;
            u.disk_mib += h.disk_mib;
        }
        u
    }

    fn reports(&self) -> Vec<SandboxReport> {
        self.lock()
            .iter()
            .map(|(id, h)| SandboxReport {
                sandbox_id: id.clone(),
                state: h.state,
            })
            .collect()
    }

    fn apply(&self, profile: &Profile, op: Operation) -> Result<Outcome, WorkerError> {
        let err = |kind, message: &str| {
            Err(WorkerError {
                kind,
                message: message.to_owned(),
            })
        };
        match &op {
            Operation::Create(spec) => self.specs.lock().unwrap().push(Sent::Create(spec.clone())),
            Operation::Resume(spec) => self.specs.lock().unwrap().push(Sent::Resume(spec.clone())),
            _ => {}
        }
        let mut map = self.lock();
        match op {
            Operation::Create(spec) => {
                if !profile.templates.contains(&spec.template_id)
                    && !self.snapshots.lock().unwrap().contains(&spec.template_id)
                {
                    return err(ErrorKind::UnknownTemplate, "template not on this host");
                }
                let in_use = u32::try_from(map.len()).unwrap();
                if in_use >= profile.capacity.max_sandboxes {
                    return err(ErrorKind::NoCapacity, "host is full");
                }
                map.insert(
                    spec.sandbox_id,
                    Held {
                        state: WorkerSandboxState::Running,
                        vcpus: spec.vcpus,
                        memory_mib: spec.memory_mib,
                        disk_mib: spec.disk_mib,
                    },
                );
                Ok(Outcome::Created)
            }
            Operation::Kill { sandbox_id } => {
                self.kills.lock().unwrap().push(sandbox_id.clone());
                match map.remove(&sandbox_id) {
                    Some(_) => Ok(Outcome::Killed),
                    None => err(ErrorKind::UnknownSandbox, "no such sandbox"),
                }
            }
            Operation::Pause { sandbox_id } => match map.get_mut(&sandbox_id) {
                Some(h) if h.state == WorkerSandboxState::Running => {
                    h.state = WorkerSandboxState::Paused;
                    Ok(Outcome::Paused)
                }
                Some(_) => err(ErrorKind::InvalidState, "not running"),
                None => err(ErrorKind::UnknownSandbox, "no such sandbox"),
            },
            Operation::Resume(spec) => match map.get_mut(&spec.sandbox_id) {
                Some(h) if h.state == WorkerSandboxState::Paused => {
                    h.state = WorkerSandboxState::Running;
                    Ok(Outcome::Resumed)
                }
                Some(_) => err(ErrorKind::InvalidState, "not paused"),
                None => err(ErrorKind::UnknownSandbox, "no such sandbox"),
            },
            Operation::Snapshot {
                sandbox_id,
                snapshot_id,
            } => match map.get(&sandbox_id) {
                Some(h) if h.state == WorkerSandboxState::Running => {
                    self.snapshots.lock().unwrap().insert(snapshot_id);
                    Ok(Outcome::Snapshotted { size_bytes: 4096 })
                }
                Some(_) => err(ErrorKind::InvalidState, "not running"),
                None => err(ErrorKind::UnknownSandbox, "no such sandbox"),
            },
            Operation::DeleteTemplate { template_id } => {
                if self.snapshots.lock().unwrap().remove(&template_id) {
                    Ok(Outcome::TemplateDeleted)
                } else {
                    err(ErrorKind::UnknownTemplate, "no such template")
                }
            }
            Operation::Metrics { sandbox_id } => match map.get(&sandbox_id) {
                Some(h) => Ok(Outcome::Metrics {
                    samples: vec![MetricSample {
                        timestamp_ms: 1,
                        cpu_count: h.vcpus,
                        cpu_used_pct: 12.5,
                        mem_used: 7,
                        mem_total: h.memory_mib * 1024 * 1024,
                        mem_cache: 0,
                        disk_used: 0,
                        disk_total: h.disk_mib * 1024 * 1024,
                    }],
                }),
                None => err(ErrorKind::UnknownSandbox, "no such sandbox"),
            },
        }
    }
}

impl Creds {
    fn identity(&self) -> Identity {
        Identity {
            worker_id: self.worker_id.clone(),
            ca_pem: self.ca_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            server_name: self.server_name.clone(),
            control_addr: self.addr,
        }
    }
}

/// The test worker's [`Handler`]: its book and what it offers.
struct Worker {
    book: Arc<Book>,
    profile: Profile,
}

#[async_trait]
impl Handler for Worker {
    async fn handle(&self, operation: Operation) -> Result<Outcome, WorkerError> {
        let silent = matches!(operation, Operation::Create(_))
            && self
                .book
                .silent_creates
                .load(std::sync::atomic::Ordering::SeqCst);
        let result = self.book.apply(&self.profile, operation);
        if silent {
            // Hold the request open without answering until control gives up.
            std::future::pending::<()>().await;
        }
        result
    }

    fn status(&self) -> Status {
        Status {
            usage: self.book.usage(),
            templates: self.book.templates(&self.profile),
            sandboxes: self.book.reports(),
        }
    }
}

/// A connected test worker.
#[derive(Debug)]
pub struct TestWorker {
    pub creds: Creds,
    pub book: Arc<Book>,
    session: Session,
}

impl TestWorker {
    /// Dials control, sends the hello and waits for the welcome.
    pub async fn connect(
        creds: &Creds,
        profile: Profile,
        book: Arc<Book>,
    ) -> Result<Self, ClientError> {
        Self::connect_with(creds, profile, book, |_| {}).await
    }

    /// [`Self::connect`] with `claimed_id` in the hello instead of the registered id.
    pub async fn connect_claiming(
        creds: &Creds,
        claimed_id: &str,
        profile: Profile,
        book: Arc<Book>,
    ) -> Result<Self, ClientError> {
        let claimed_id = claimed_id.to_owned();
        Self::connect_with(creds, profile, book, move |hello| {
            hello.worker_id = claimed_id;
        })
        .await
    }

    /// [`Self::connect`] with the hello changed by `edit` before it is sent.
    pub async fn connect_with(
        creds: &Creds,
        profile: Profile,
        book: Arc<Book>,
        edit: impl FnOnce(&mut Hello),
    ) -> Result<Self, ClientError> {
        let mut hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            worker_id: creds.worker_id.clone(),
            worker_version: "test-worker".into(),
            capacity: profile.capacity,
            templates: book.templates(&profile),
            usage: book.usage(),
            sandboxes: book.reports(),
        };
        edit(&mut hello);
        let handler = Arc::new(Worker {
            book: book.clone(),
            profile,
        });
        let session = Session::join(&creds.identity(), hello, handler).await?;
        Ok(Self {
            creds: creds.clone(),
            book,
            session,
        })
    }

    /// Stops heartbeating and answering, without closing the connection: a hung worker or a
    /// cut network, as control sees it.
    pub fn vanish(&self) {
        self.session.halt();
    }

    /// The worker's session (for worker → control requests such as certificate renewal).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Closes the connection cleanly (a worker restarting its control connection).
    pub async fn disconnect(self) -> Arc<Book> {
        self.session.leave().await;
        self.book
    }

    /// Why the connection closed, once it has.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.session.closed().await
    }
}

/// A signed-up user made platform administrator (in the database, as the operator would).
pub async fn platform_admin(app: &TestApp, email: &str) -> super::User {
    let admin = app.signup(email).await;
    assert!(
        roost_control::store::users::set_platform_admin(&app.db, &admin.id, true)
            .await
            .unwrap()
    );
    admin
}

/// Registers a worker with a fresh token from `admin` and connects it with `profile`.
pub async fn join(app: &TestApp, admin: &super::User, profile: Profile) -> TestWorker {
    let r = app
        .call(
            Method::POST,
            "/v1/admin/workers/registration-tokens",
            Auth::Jwt(&admin.token),
            Some(json!({"name": "rack", "ttlSecs": 600})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let creds = register(app, r.body["token"].as_str().unwrap())
        .await
        .unwrap_or_else(|r| panic!("registration failed: {}", r.text));
    TestWorker::connect(&creds, profile, Arc::default())
        .await
        .unwrap()
}
