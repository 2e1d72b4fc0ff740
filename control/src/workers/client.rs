//! The worker's end of the control channel: dial control with the registered certificate, say
//! hello, heartbeat, and answer control's requests with a [`Handler`].
//!
//! It lives here, beside the server, so both ends of the protocol are tested together; the
//! worker binary uses it as a library. Registration itself is one REST call
//! (`POST /v1/workers/register`, see `api::v1::workers`) with a CSR from
//! [`crate::pki::new_key_and_csr`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use roost_proto::control::{
    CodecError, ControlMessage, ErrorKind, Heartbeat, Hello, JsonCodec, Operation, Outcome,
    PROTOCOL_VERSION, Request, Response, SandboxReport, Usage, WorkerError, WorkerMessage,
    WorkerOperation, WorkerOutcome, WorkerReply, WorkerRequest,
};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::pki::{self, PkiError};

/// What a worker needs to dial control (from its registration).
#[derive(Debug, Clone)]
pub struct Identity {
    pub worker_id: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub server_name: String,
    pub control_addr: SocketAddr,
}

/// What a heartbeat reports, sampled each time one is sent.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub usage: Usage,
    pub templates: Vec<String>,
    pub sandboxes: Vec<SandboxReport>,
}

/// The worker's side of the operations.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Carries out one request from control.
    async fn handle(&self, operation: Operation) -> Result<Outcome, WorkerError>;
    /// The worker's current state, for the next heartbeat.
    fn status(&self) -> Status;
}

/// Why the worker could not join control.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid worker credentials")]
    Credentials(#[from] PkiError),
    #[error("cannot open a UDP socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot start connecting")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection to control failed")]
    Connection(#[from] quinn::ConnectionError),
    #[error("session stream failed")]
    Codec(#[from] CodecError),
    #[error("control closed the session before welcoming the worker")]
    NoWelcome,
    #[error("no welcome within {0:?}")]
    WelcomeTimeout(Duration),
    #[error("control rejected the worker: {0}")]
    Rejected(String),
    #[error("request stream failed")]
    Stream(#[from] quinn::ClosedStream),
    #[error("control closed the request stream without answering")]
    NoReply,
    #[error("control answered request {got} on the stream of request {expected}")]
    WrongReply { expected: u64, got: u64 },
    #[error("no answer from control within {0:?}")]
    ReplyTimeout(Duration),
    #[error("control refused the request")]
    Refused(#[source] WorkerError),
}

/// A certificate control issued in exchange for a CSR ([`Session::renew_certificate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewedCertificate {
    pub certificate_pem: String,
    /// Expiry, Unix seconds.
    pub not_after_unix: i64,
}

/// Longest wait for control's answer to a worker request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a certificate expiring at `not_after_unix` should be renewed at `now_unix`: once
/// less than a third of a full validity period is left, so a worker renewing on a daily check
/// has months of slack against outages.
pub fn renewal_due(not_after_unix: i64, now_unix: i64) -> bool {
    let third = i64::try_from(crate::pki::WORKER_CERT_VALIDITY.as_secs() / 3).unwrap_or(i64::MAX);
    not_after_unix.saturating_sub(now_unix) < third
}

/// Longest wait for control's welcome.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// A worker joined to control. Dropping it stops heartbeats and request handling.
#[derive(Debug)]
pub struct Session {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    heartbeat_interval: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next_request: std::sync::atomic::AtomicU64,
}

type Writer = FramedWrite<quinn::SendStream, JsonCodec<ControlMessage, WorkerMessage>>;
type Reader = FramedRead<quinn::RecvStream, JsonCodec<ControlMessage, WorkerMessage>>;

impl Session {
    /// Dials control, sends `hello` (its `worker_id` should be the identity's) and, once
    /// welcomed, starts heartbeating and serving requests with `handler`.
    pub async fn join(
        identity: &Identity,
        hello: Hello,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, ClientError> {
        let client = pki::client_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)?;
        let bind: SocketAddr = if identity.control_addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Socket)?;
        endpoint.set_default_client_config(client);
        let connection = endpoint
            .connect(identity.control_addr, &identity.server_name)?
            .await?;
        let (send, recv) = connection.open_bi().await?;
        let mut writer: Writer = FramedWrite::new(send, JsonCodec::new());
        let mut reader: Reader = FramedRead::new(recv, JsonCodec::new());
        writer.send(WorkerMessage::Hello(hello)).await?;
        let answer = tokio::time::timeout(WELCOME_TIMEOUT, reader.next())
            .await
            .map_err(|_| ClientError::WelcomeTimeout(WELCOME_TIMEOUT))?
            .ok_or(ClientError::NoWelcome)??;
        let heartbeat_interval = match answer {
            ControlMessage::Welcome {
                heartbeat_interval_ms,
                ..
            } => Duration::from_millis(heartbeat_interval_ms.max(10)),
            ControlMessage::Rejected { reason } => return Err(ClientError::Rejected(reason)),
        };
        let heartbeats = tokio::spawn(heartbeat_loop(
            writer,
            reader,
            heartbeat_interval,
            handler.clone(),
        ));
        let server = tokio::spawn(serve_requests(connection.clone(), handler));
        Ok(Self {
            endpoint,
            connection,
            heartbeat_interval,
            tasks: vec![heartbeats, server],
            next_request: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Asks control for a new certificate for the key behind `csr_pem` (from
    /// [`crate::pki::new_key_and_csr`]). The current certificate stays valid until it expires;
    /// use the new one (with the new key) for the next connection.
    pub async fn renew_certificate(
        &self,
        csr_pem: &str,
    ) -> Result<RenewedCertificate, ClientError> {
        let request_id = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let operation = WorkerOperation::RenewCertificate {
            csr_pem: csr_pem.to_owned(),
        };
        match self.request(request_id, operation).await? {
            WorkerOutcome::Certificate {
                certificate_pem,
                not_after_unix,
            } => Ok(RenewedCertificate {
                certificate_pem,
                not_after_unix,
            }),
        }
    }

    async fn request(
        &self,
        request_id: u64,
        operation: WorkerOperation,
    ) -> Result<WorkerOutcome, ClientError> {
        let exchange = async {
            let (send, recv) = self.connection.open_bi().await?;
            let mut writer = FramedWrite::new(send, JsonCodec::<WorkerReply, WorkerRequest>::new());
            writer
                .send(WorkerRequest {
                    protocol_version: PROTOCOL_VERSION,
                    request_id,
                    operation,
                })
                .await?;
            writer.into_inner().finish()?;
            let mut reader = FramedRead::new(recv, JsonCodec::<WorkerReply, WorkerRequest>::new());
            let reply = reader.next().await.ok_or(ClientError::NoReply)??;
            if reply.request_id != request_id {
                return Err(ClientError::WrongReply {
                    expected: request_id,
                    got: reply.request_id,
                });
            }
            reply.result.map_err(ClientError::Refused)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::ReplyTimeout(REQUEST_TIMEOUT))?
    }

    /// The interval control asked for.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// Stops heartbeating and answering without closing the connection: control then sees a
    /// silent worker (for drills and tests of host loss).
    pub fn halt(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Leaves cleanly: stops the tasks, closes the connection and waits for it to finish.
    pub async fn leave(self) {
        self.halt();
        self.connection.close(0u32.into(), b"worker leaving");
        self.endpoint.wait_idle().await;
    }

    /// Resolves when the connection ends, with why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.connection.closed().await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn heartbeat_loop(
    mut writer: Writer,
    // Held so that the session stream's receive side stays open.
    _reader: Reader,
    interval: Duration,
    handler: Arc<dyn Handler>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 1.. {
        tick.tick().await;
        let status = handler.status();
        let beat = WorkerMessage::Heartbeat(Heartbeat {
            seq,
            usage: status.usage,
            templates: status.templates,
            sandboxes: status.sandboxes,
        });
        if let Err(e) = writer.send(beat).await {
            tracing::warn!(error = %e, "heartbeat failed; session over");
            return;
        }
    }
}

async fn serve_requests(connection: quinn::Connection, handler: Arc<dyn Handler>) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(send, recv, handler.as_ref()).await {
                tracing::warn!(error = %e, "cannot answer a control request");
            }
        });
    }
}

/// Why one request could not be answered.
#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("request stream failed")]
    Codec(#[from] CodecError),
    #[error("control closed the stream without a request")]
    Empty,
    #[error("cannot finish the answer")]
    Finish(#[from] quinn::ClosedStream),
}

async fn answer(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    handler: &dyn Handler,
) -> Result<(), AnswerError> {
    let mut reader = FramedRead::new(recv, JsonCodec::<Request, Response>::new());
    let request = reader.next().await.ok_or(AnswerError::Empty)??;
    let result = if request.protocol_version == PROTOCOL_VERSION {
        handler.handle(request.operation).await
    } else {
        Err(WorkerError {
            kind: ErrorKind::UnsupportedVersion,
            message: format!(
                "this worker speaks protocol {PROTOCOL_VERSION}, not {}",
                request.protocol_version
            ),
        })
    };
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
