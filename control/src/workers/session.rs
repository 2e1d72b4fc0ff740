//! One worker connection: identify the host by its certificate, take the hello, welcome it,
//! reconcile, then read heartbeats until the stream ends or falls silent.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use roost_proto::control::{
    CodecError, ControlMessage, Hello, JsonCodec, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    SandboxReport, WorkerMessage,
};
use rustls::pki_types::CertificateDer;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::server::Shared;
use super::{millis, reconcile, requests};
use crate::pki::fingerprint;
use crate::store::audit::{self, Actor};
use crate::store::{StoreError, hosts, now_ms};

/// QUIC application close codes control uses.
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const REJECTED: u32 = 1;
    pub const LOST: u32 = 2;
    pub const PROTOCOL: u32 = 3;
}

type Reader = FramedRead<quinn::RecvStream, JsonCodec<WorkerMessage, ControlMessage>>;
type Writer = FramedWrite<quinn::SendStream, JsonCodec<WorkerMessage, ControlMessage>>;

/// Why a session ended other than by the worker leaving.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("worker rejected: {0}")]
    Rejected(String),
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    #[error("session stream failed")]
    Codec(#[from] CodecError),
    #[error("no hello within the deadline")]
    HelloTimeout,
    #[error("storage failed")]
    Store(#[from] StoreError),
}

/// Serves `connection` until it ends, logging how it ended.
pub async fn run(shared: Arc<Shared>, connection: quinn::Connection) {
    let remote = connection.remote_address();
    match serve(&shared, &connection).await {
        Ok(()) => tracing::info!(%remote, "worker session ended"),
        Err(e @ SessionError::Rejected(_)) => tracing::warn!(%remote, error = %e, "worker refused"),
        Err(e) => tracing::warn!(%remote, error = %e, "worker session failed"),
    }
}

/// SHA-256 of the client certificate the TLS handshake verified.
fn peer_fingerprint(connection: &quinn::Connection) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|leaf| fingerprint(leaf))
}

async fn reject(
    connection: &quinn::Connection,
    writer: Option<&mut Writer>,
    reason: String,
) -> SessionError {
    if let Some(w) = writer {
        // Best effort: the worker learns why before the connection closes.
        let _ = w
            .send(ControlMessage::Rejected {
                reason: reason.clone(),
            })
            .await;
        let _ = w.get_mut().finish();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(1), w.get_mut().stopped()).await;
    }
    connection.close(
        quinn::VarInt::from_u32(close_code::REJECTED),
        reason.as_bytes(),
    );
    SessionError::Rejected(reason)
}

async fn serve(shared: &Arc<Shared>, connection: &quinn::Connection) -> Result<(), SessionError> {
    // The TLS layer already refused certificates the CA did not sign; this maps a valid one
    // to the host it was issued to (and refuses one whose host was deleted or re-registered).
    let host = match peer_fingerprint(connection) {
        Some(sha) => hosts::by_cert(&shared.db, &sha).await?,
        None => None,
    };
    let Some(host) = host else {
        return Err(reject(connection, None, "unknown worker certificate".into()).await);
    };

    let hello_timeout = shared.config.hello_timeout;
    let (send, recv) = tokio::time::timeout(hello_timeout, connection.accept_bi())
        .await
        .map_err(|_| SessionError::HelloTimeout)??;
    let mut reader: Reader = FramedRead::new(recv, JsonCodec::new());
    let mut writer: Writer = FramedWrite::new(send, JsonCodec::new());
    let hello = match tokio::time::timeout(hello_timeout, reader.next()).await {
        Err(_) => return Err(SessionError::HelloTimeout),
        Ok(None) => return Err(reject(connection, None, "no hello".into()).await),
        Ok(Some(message)) => message?,
    };
    let WorkerMessage::Hello(hello) = hello else {
        let reason = "the first message must be a hello".to_owned();
        return Err(reject(connection, Some(&mut writer), reason).await);
    };
    if let Err(reason) = check_hello(&hello, &host.id) {
        return Err(reject(connection, Some(&mut writer), reason).await);
    }
    // Before placement can use the connection: what changes on this host from now on is not
    // described by the hello (see `reconcile::on_connect`).
    let hello_at = crate::store::now_ms();

    hosts::mark_connected(&shared.db, &host.id, &reported(&hello)).await?;
    let epoch = shared.registry.attach(&host.id, connection.clone(), &hello);
    shared.registry.set_draining(&host.id, host.draining != 0);
    let hello = ArrivedHello {
        hello: &hello,
        at_ms: hello_at,
    };
    let result = session(shared, connection, &host.id, epoch, hello, reader, writer).await;
    shared.registry.detach(&host.id, epoch);
    result
}

fn check_hello(hello: &Hello, host_id: &str) -> Result<(), String> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.protocol_version) {
        return Err(format!(
            "protocol version {} is not supported (control speaks {MIN_PROTOCOL_VERSION} to \
             {PROTOCOL_VERSION})",
            hello.protocol_version
        ));
    }
    if hello.worker_id != host_id {
        return Err(format!(
            "hello names worker {:?} but the certificate belongs to {host_id:?}",
            hello.worker_id
        ));
    }
    Ok(())
}

fn reported(hello: &Hello) -> hosts::Reported<'_> {
    let c = &hello.capacity;
    hosts::Reported {
        cpu_count: i64::from(c.vcpus),
        memory_mb: i64::try_from(c.memory_mib).unwrap_or(i64::MAX),
        disk_mb: i64::try_from(c.disk_mib).unwrap_or(i64::MAX),
        max_sandboxes: i64::from(c.max_sandboxes),
        templates: &hello.templates,
        worker_version: &hello.worker_version,
    }
}

/// A worker's hello and when it arrived (Unix ms), before the connection could be used.
#[derive(Clone, Copy)]
struct ArrivedHello<'a> {
    hello: &'a Hello,
    at_ms: i64,
}

async fn session(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    host_id: &str,
    epoch: u64,
    arrived: ArrivedHello<'_>,
    mut reader: Reader,
    mut writer: Writer,
) -> Result<(), SessionError> {
    let hello = arrived.hello;
    let interval = shared.config.heartbeat_interval;
    writer
        .send(ControlMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: u64::try_from(millis(interval)).unwrap_or(u64::MAX),
        })
        .await?;
    tracing::info!(host = host_id, version = %hello.worker_version, "worker connected");
    audit::record(
        shared.db.pool(),
        audit::Event {
            team_id: None,
            actor: &Actor::System,
            action: "host.connect",
            target_kind: "host",
            target_id: Some(host_id),
            details: serde_json::json!({
                "version": hello.worker_version,
                "remote": connection.remote_address().to_string(),
                "sandboxes": hello.sandboxes.len(),
            }),
        },
    )
    .await?;
    // Reconciliation runs beside the heartbeat loop, so that a large or slow one never delays
    // the heartbeats that keep the host alive; it always works on the latest report.
    let (reports, latest) = tokio::sync::watch::channel(None);
    let reconciler = tokio::spawn(reconcile::run(
        shared.clone(),
        host_id.to_owned(),
        hello.sandboxes.clone(),
        arrived.at_ms,
        latest,
    ));
    let worker_requests = tokio::spawn(requests::serve(
        shared.clone(),
        connection.clone(),
        host_id.to_owned(),
    ));
    let result = heartbeats(shared, connection, host_id, epoch, &mut reader, &reports).await;
    reconciler.abort();
    worker_requests.abort();
    result
}

/// Reads heartbeats until the stream ends or falls silent for `lost_after` (the monitor then
/// marks the host lost).
async fn heartbeats(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    host_id: &str,
    epoch: u64,
    reader: &mut Reader,
    reports: &tokio::sync::watch::Sender<Option<Vec<SandboxReport>>>,
) -> Result<(), SessionError> {
    let silence = shared.config.lost_after;
    loop {
        let message = match tokio::time::timeout(silence, reader.next()).await {
            Err(_) => {
                tracing::warn!(host = host_id, "no heartbeat; closing the connection");
                connection.close(
                    quinn::VarInt::from_u32(close_code::LOST),
                    b"heartbeats missed",
                );
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Ok(Some(message)) => message?,
        };
        let WorkerMessage::Heartbeat(heartbeat) = message else {
            connection.close(
                quinn::VarInt::from_u32(close_code::PROTOCOL),
                b"a second hello on the session stream",
            );
            return Ok(());
        };
        let Some(draining) = hosts::heartbeat(&shared.db, host_id, now_ms()).await? else {
            // Marked lost while we were waiting: reconnecting reconciles it.
            connection.close(
                quinn::VarInt::from_u32(close_code::LOST),
                b"marked lost; reconnect",
            );
            return Ok(());
        };
        // Another control instance may have (un)drained the host: the database decides.
        shared.registry.set_draining(host_id, draining);
        shared
            .registry
            .report(host_id, epoch, heartbeat.usage, &heartbeat.templates);
        reports.send_replace(Some(heartbeat.sandboxes));
    }
}
