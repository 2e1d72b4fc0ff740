//! An in-process worker that speaks the real control channel (QUIC + mutual TLS on
//! 127.0.0.1) and "runs" sandboxes in a map: registration with a token and a CSR, hello,
//! heartbeats, and answers to create/kill/pause/resume/snapshot/metrics requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::http::{Method, StatusCode};
use futures_util::{SinkExt, StreamExt};
use rcgen::{CertificateParams, KeyPair};
use roost_proto::control::{
    Capacity, ControlMessage, ErrorKind, Heartbeat, Hello, JsonCodec, MetricSample, Operation,
    Outcome, PROTOCOL_VERSION, Request, Response, SandboxReport, Usage, WorkerError, WorkerMessage,
    WorkerSandboxState,
};
use serde_json::json;
use tokio_util::codec::{FramedRead, FramedWrite};

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

/// A PEM CSR for a fresh key, and the key.
pub fn csr() -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(vec!["worker.test".to_owned()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
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
        key_pem: key.serialize_pem(),
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
        let mut map = self.lock();
        match op {
            Operation::Create(spec) => {
                if !profile.templates.contains(&spec.template_id) {
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
            Operation::Snapshot { sandbox_id, .. } => match map.get(&sandbox_id) {
                Some(_) => Ok(Outcome::Snapshotted { size_bytes: 4096 }),
                None => err(ErrorKind::UnknownSandbox, "no such sandbox"),
            },
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

/// A connected test worker.
#[derive(Debug)]
pub struct TestWorker {
    pub creds: Creds,
    pub book: Arc<Book>,
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestWorker {
    /// Dials control, sends the hello and waits for the welcome.
    pub async fn connect(creds: &Creds, profile: Profile, book: Arc<Book>) -> anyhow::Result<Self> {
        Self::connect_with(creds, profile, book, |_| {}).await
    }

    /// [`Self::connect`] with `claimed_id` in the hello instead of the registered id.
    pub async fn connect_claiming(
        creds: &Creds,
        claimed_id: &str,
        profile: Profile,
        book: Arc<Book>,
    ) -> anyhow::Result<Self> {
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
    ) -> anyhow::Result<Self> {
        let client =
            roost_control::pki::client_config(&creds.ca_pem, &creds.cert_pem, &creds.key_pem)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(client);
        let connection = endpoint
            .connect(creds.addr, &creds.server_name)?
            .await
            .context("QUIC handshake")?;
        let (send, recv) = connection.open_bi().await.context("open session stream")?;
        let mut writer = FramedWrite::new(send, JsonCodec::<ControlMessage, WorkerMessage>::new());
        let mut reader = FramedRead::new(recv, JsonCodec::<ControlMessage, WorkerMessage>::new());
        let mut hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            worker_id: creds.worker_id.clone(),
            worker_version: "test-worker".into(),
            capacity: profile.capacity,
            templates: profile.templates.clone(),
            usage: book.usage(),
            sandboxes: book.reports(),
        };
        edit(&mut hello);
        writer
            .send(WorkerMessage::Hello(hello))
            .await
            .context("send hello")?;
        let answer = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .context("no welcome within 10 s")?
            .context("session stream closed before the welcome")?
            .context("read welcome")?;
        let interval = match answer {
            ControlMessage::Welcome {
                heartbeat_interval_ms,
                ..
            } => Duration::from_millis(heartbeat_interval_ms),
            ControlMessage::Rejected { reason } => bail!("rejected: {reason}"),
        };

        let heartbeats = {
            let (book, templates) = (book.clone(), profile.templates.clone());
            tokio::spawn(async move {
                // Keep the receive side open for the session's life.
                let _reader = reader;
                let mut tick = tokio::time::interval(interval);
                for seq in 1.. {
                    tick.tick().await;
                    let beat = WorkerMessage::Heartbeat(Heartbeat {
                        seq,
                        usage: book.usage(),
                        templates: templates.clone(),
                        sandboxes: book.reports(),
                    });
                    if writer.send(beat).await.is_err() {
                        return;
                    }
                }
            })
        };
        let server = {
            let (book, connection) = (book.clone(), connection.clone());
            tokio::spawn(async move {
                while let Ok((send, recv)) = connection.accept_bi().await {
                    let (book, profile) = (book.clone(), profile.clone());
                    tokio::spawn(async move {
                        if let Err(e) = answer_one(send, recv, &book, &profile).await {
                            eprintln!("test worker request failed: {e:#}");
                        }
                    });
                }
            })
        };
        Ok(Self {
            creds: creds.clone(),
            book,
            endpoint,
            connection,
            tasks: vec![heartbeats, server],
        })
    }

    /// Stops heartbeating and answering, without closing the connection: a hung worker or a
    /// cut network, as control sees it.
    pub fn vanish(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Closes the connection cleanly (a worker restarting its control connection).
    pub async fn disconnect(self) -> Arc<Book> {
        self.vanish();
        self.connection.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
        self.book.clone()
    }

    /// Why the connection closed, once it has.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.connection.closed().await
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn answer_one(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    book: &Book,
    profile: &Profile,
) -> anyhow::Result<()> {
    let mut reader = FramedRead::new(recv, JsonCodec::<Request, Response>::new());
    let request = reader.next().await.context("no request")??;
    let silent = matches!(request.operation, Operation::Create(_))
        && book
            .silent_creates
            .load(std::sync::atomic::Ordering::SeqCst);
    let result = if request.protocol_version == PROTOCOL_VERSION {
        book.apply(profile, request.operation)
    } else {
        Err(WorkerError {
            kind: ErrorKind::UnsupportedVersion,
            message: "unsupported".into(),
        })
    };
    if silent {
        // Hold the stream open without answering until control gives up.
        std::future::pending::<()>().await;
    }
    let mut writer = FramedWrite::new(send, JsonCodec::<Request, Response>::new());
    writer
        .send(Response {
            request_id: request.request_id,
            result,
        })
        .await?;
    writer.into_inner().finish()?;
    Ok(())
}
