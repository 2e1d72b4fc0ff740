//! One tunnel stream on the worker: read the header, ask the splicer, answer the status, then
//! copy bytes both ways until each side has finished its half.

use std::sync::Arc;
use std::time::Duration;

use roost_proto::quic_stream::QuicStream;
use roost_proto::tunnel::{Status, StreamHeader};
use tokio::io::AsyncWriteExt;

use super::{SpliceError, Splicer};

/// Serves one stream the gateway opened.
pub async fn serve<S: Splicer>(splicer: Arc<S>, mut stream: QuicStream, header_timeout: Duration) {
    let header = match tokio::time::timeout(header_timeout, StreamHeader::read(&mut stream)).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad tunnel header");
            answer(stream, Status::Error(format!("bad tunnel header: {e}"))).await;
            return;
        }
        Err(_) => {
            answer(stream, Status::Error("no tunnel header in time".into())).await;
            return;
        }
    };
    let mut target = match splicer.open(&header.sandbox_id, header.port).await {
        Ok(target) => target,
        Err(e) => {
            tracing::debug!(sandbox_id = %header.sandbox_id.as_str(), port = header.port, error = %e, "tunnel target refused");
            let status = match e {
                SpliceError::SandboxNotFound => Status::SandboxNotFound,
                SpliceError::PortClosed => Status::PortClosed,
                SpliceError::Failed(message) => Status::Error(message),
            };
            answer(stream, status).await;
            return;
        }
    };
    if stream.write_all(&Status::Ok.encode()).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut stream, &mut target).await {
        Ok((up, down)) => tracing::trace!(
            sandbox_id = %header.sandbox_id.as_str(),
            port = header.port,
            up,
            down,
            "tunnel stream done"
        ),
        // Either end went away mid-transfer; dropping both cuts the other one (the QUIC stream
        // is reset, the target connection closed).
        Err(e) => tracing::debug!(
            sandbox_id = %header.sandbox_id.as_str(),
            port = header.port,
            error = %e,
            "tunnel stream cut"
        ),
    }
}

/// Writes a final status and finishes the stream.
async fn answer(mut stream: QuicStream, status: Status) {
    if stream.write_all(&status.encode()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}
