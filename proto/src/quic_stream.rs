//! One QUIC bidirectional stream as a single tokio byte stream (feature `tls`).
//!
//! quinn hands out the two halves of a stream separately, and their inherent `poll_read` /
//! `poll_write` shadow tokio's traits; [`QuicStream`] joins them behind `AsyncRead` +
//! `AsyncWrite` and fixes what a drop means. quinn *finishes* a send stream that is dropped,
//! which would tell the peer "that was all of it" even when the copy was cut short (a client that
//! vanished mid-upload would look like a complete, shorter body). A [`QuicStream`] dropped before
//! [`AsyncWrite::poll_shutdown`] therefore *resets* its send half with [`ABORTED`], so the peer
//! sees an error, never a clean end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Application error code of a stream reset because its user went away mid-transfer.
pub const ABORTED: quinn::VarInt = quinn::VarInt::from_u32(1);

/// Both halves of one bidirectional QUIC stream.
#[derive(Debug)]
pub struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Our half was finished on purpose; dropping must not reset it.
    finished: bool,
}

impl QuicStream {
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            send,
            recv,
            finished: false,
        }
    }

    /// The QUIC stream id (for logs).
    pub fn id(&self) -> quinn::StreamId {
        self.send.id()
    }

    /// Abandons the stream in both directions with `code`: the peer's reads and writes fail.
    pub fn abort(mut self, code: quinn::VarInt) {
        let _ = self.send.reset(code);
        let _ = self.recv.stop(code);
        self.finished = true;
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx);
        if let Poll::Ready(Ok(())) = result {
            self.finished = true;
        }
        result
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        if !self.finished {
            // Already closed or reset streams refuse; nothing else to do then.
            let _ = self.send.reset(ABORTED);
        }
    }
}
