//! Requests a worker makes of control, each on a bidirectional stream the worker opens after
//! the welcome: one [`WorkerRequest`] in, one [`WorkerReply`] out. Today that is certificate
//! renewal.
//!
//! # Certificate renewal
//! The worker generates a new key and sends a CSR over the connection its current certificate
//! authenticated, so no token is needed: the mutual-TLS session *is* the proof of identity.
//! Control signs a certificate for the same worker id, makes it the host's current one and
//! keeps the replaced one as `previous_cert_sha256`: that one stays accepted until it expires
//! (TLS enforces expiry), so a worker that has not yet switched, or a second process of the
//! same worker, can still connect. Only one previous certificate is kept: renewing twice drops
//! the oldest.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use roost_proto::control::{
    CodecError, ErrorKind, JsonCodec, PROTOCOL_VERSION, WorkerError, WorkerOperation,
    WorkerOutcome, WorkerReply, WorkerRequest,
};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::server::Shared;
use crate::pki::PkiError;
use crate::store::audit::{self, Actor};
use crate::store::{StoreError, hosts};

/// Largest accepted CSR (PEM).
const MAX_CSR_LEN: usize = 16 * 1024;

/// Why a worker request could not be answered at all.
#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("request stream failed")]
    Codec(#[from] CodecError),
    #[error("the worker closed the stream without a request")]
    Empty,
    #[error("cannot finish the reply")]
    Finish(#[from] quinn::ClosedStream),
}

/// Accepts and answers the worker's requests until the connection ends.
pub async fn serve(shared: Arc<Shared>, connection: quinn::Connection, host_id: String) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        let shared = shared.clone();
        let host_id = host_id.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(&shared, &host_id, send, recv).await {
                tracing::warn!(host = %host_id, error = %e, "cannot answer a worker request");
            }
        });
    }
}

async fn answer(
    shared: &Shared,
    host_id: &str,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), AnswerError> {
    let mut reader = FramedRead::new(recv, JsonCodec::<WorkerRequest, WorkerReply>::new());
    let request = reader.next().await.ok_or(AnswerError::Empty)??;
    let result = if request.protocol_version == PROTOCOL_VERSION {
        handle(shared, host_id, request.operation).await
    } else {
        Err(WorkerError {
            kind: ErrorKind::UnsupportedVersion,
            message: format!(
                "control speaks protocol {PROTOCOL_VERSION}, not {}",
                request.protocol_version
            ),
        })
    };
    let mut writer = FramedWrite::new(send, JsonCodec::<WorkerRequest, WorkerReply>::new());
    writer
        .send(WorkerReply {
            request_id: request.request_id,
            result,
        })
        .await?;
    writer.into_inner().finish()?;
    Ok(())
}

fn error(kind: ErrorKind, message: impl Into<String>) -> WorkerError {
    WorkerError {
        kind,
        message: message.into(),
    }
}

fn internal(e: &StoreError) -> WorkerError {
    tracing::error!(error = %e, "worker request failed on storage");
    error(ErrorKind::Internal, "control could not store the result")
}

async fn handle(
    shared: &Shared,
    host_id: &str,
    operation: WorkerOperation,
) -> Result<WorkerOutcome, WorkerError> {
    match operation {
        WorkerOperation::RenewCertificate { csr_pem } => renew(shared, host_id, &csr_pem).await,
    }
}

async fn renew(
    shared: &Shared,
    host_id: &str,
    csr_pem: &str,
) -> Result<WorkerOutcome, WorkerError> {
    if csr_pem.len() > MAX_CSR_LEN {
        return Err(error(ErrorKind::InvalidRequest, "csr is too large"));
    }
    let issued = shared
        .ca
        .issue_worker(csr_pem, host_id)
        .map_err(|e| match e {
            PkiError::BadCsr(_) => error(
                ErrorKind::InvalidRequest,
                "csr is not a valid PEM certificate request",
            ),
            other => {
                tracing::error!(error = %other, "cannot sign a renewed worker certificate");
                error(
                    ErrorKind::Internal,
                    "control could not sign the certificate",
                )
            }
        })?;
    let host = hosts::get(&shared.db, host_id)
        .await
        .map_err(|e| internal(&e))?
        .ok_or_else(|| {
            error(
                ErrorKind::InvalidRequest,
                "this host is no longer registered",
            )
        })?;
    let current = host.cert_sha256.unwrap_or_default();
    if !hosts::renew_cert(&shared.db, host_id, &current, &issued.sha256)
        .await
        .map_err(|e| internal(&e))?
    {
        return Err(error(
            ErrorKind::Internal,
            "another renewal of this host raced this one; retry",
        ));
    }
    audit::record(
        shared.db.pool(),
        audit::Event {
            team_id: None,
            actor: &Actor::System,
            action: "host.certificate_renew",
            target_kind: "host",
            target_id: Some(host_id),
            details: serde_json::json!({
                "previous_cert_sha256": current,
                "cert_sha256": issued.sha256,
                "not_after": issued.not_after_unix,
            }),
        },
    )
    .await
    .map_err(|e| internal(&e))?;
    tracing::info!(host = host_id, "renewed worker certificate");
    Ok(WorkerOutcome::Certificate {
        certificate_pem: issued.pem,
        not_after_unix: issued.not_after_unix,
    })
}
