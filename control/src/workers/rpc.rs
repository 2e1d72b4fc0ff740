//! One control → worker request: open a stream, send the [`Request`], finish, read the one
//! [`Response`], all within a timeout.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roost_proto::control::{
    CodecError, ErrorKind, JsonCodec, Operation, Outcome, PROTOCOL_VERSION, Request, Response,
    WorkerError,
};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::placement::PlacementError;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connection to the worker failed")]
    Connection(#[from] quinn::ConnectionError),
    #[error("request stream failed")]
    Stream(#[from] quinn::ClosedStream),
    #[error("cannot exchange messages with the worker")]
    Codec(#[from] CodecError),
    #[error("the worker closed the request stream without answering")]
    NoAnswer,
    #[error("the worker answered request {got} on the stream of request {expected}")]
    WrongRequestId { expected: u64, got: u64 },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the worker answered {0:?} to a different operation")]
    UnexpectedOutcome(Outcome),
    #[error("the worker refused")]
    Worker(#[source] WorkerError),
}

impl CallError {
    /// The placement error for a failed request to `host`.
    pub fn into_placement(self, host: &str, sandbox: &str, template: &str) -> PlacementError {
        match self {
            Self::Worker(e) => match e.kind {
                ErrorKind::NoCapacity => PlacementError::NoCapacity {
                    template: template.to_owned(),
                },
                ErrorKind::UnknownTemplate => PlacementError::NoTemplateHost {
                    template: template.to_owned(),
                },
                ErrorKind::UnknownSandbox => PlacementError::UnknownSandbox {
                    host: host.to_owned(),
                    sandbox: sandbox.to_owned(),
                },
                _ => PlacementError::Refused { reason: e.message },
            },
            Self::Timeout(_) => PlacementError::Timeout {
                host: host.to_owned(),
            },
            Self::Connection(_) | Self::Stream(_) | Self::Codec(_) | Self::NoAnswer => {
                PlacementError::HostUnavailable {
                    host: host.to_owned(),
                }
            }
            Self::WrongRequestId { .. } | Self::UnexpectedOutcome(_) => PlacementError::Refused {
                reason: self.to_string(),
            },
        }
    }
}

/// Sends `operation` as request `request_id` on a new stream of `connection`.
pub async fn call(
    connection: &quinn::Connection,
    request_id: u64,
    operation: Operation,
    timeout: Duration,
) -> Result<Outcome, CallError> {
    let exchange = async {
        let (send, recv) = connection.open_bi().await?;
        let mut writer = FramedWrite::new(send, JsonCodec::<Response, Request>::new());
        writer
            .send(Request {
                protocol_version: PROTOCOL_VERSION,
                request_id,
                operation,
            })
            .await?;
        writer.into_inner().finish()?;
        let mut reader = FramedRead::new(recv, JsonCodec::<Response, Request>::new());
        let response = reader.next().await.ok_or(CallError::NoAnswer)??;
        if response.request_id != request_id {
            return Err(CallError::WrongRequestId {
                expected: request_id,
                got: response.request_id,
            });
        }
        response.result.map_err(CallError::Worker)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CallError::Timeout(timeout))?
}
