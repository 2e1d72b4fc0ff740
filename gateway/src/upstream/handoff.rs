//! Hands one already-open stream to Pingora as its upstream connection.
//!
//! Pingora's custom L4 hook (`PeerOptions::custom_l4`) calls `connect(addr)` and expects a
//! [`Stream`]; [`Handoff`] answers that call once with the stream the request filter opened.
//! Pingora never reuses such connections (they have no file descriptor), so each request owns
//! its stream and the peer is marked not to be pooled.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::{Error, ErrorType};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::UpstreamIo;

/// The single stream for one request's upstream connection.
pub struct Handoff {
    stream: Mutex<Option<Box<dyn UpstreamIo>>>,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff").finish_non_exhaustive()
    }
}

impl Handoff {
    pub fn new(stream: Box<dyn UpstreamIo>) -> Self {
        Self {
            stream: Mutex::new(Some(stream)),
        }
    }
}

#[async_trait]
impl L4Connect for Handoff {
    async fn connect(&self, _addr: &SocketAddr) -> pingora::Result<Stream> {
        let stream = self.stream.lock().unwrap_or_else(|e| e.into_inner()).take();
        match stream {
            Some(stream) => Ok(Stream::from(VirtualSocketStream::new(Box::new(Socket(
                Mutex::new(stream),
            ))))),
            // A retry would need a new tunnel stream; the proxy does not retry these.
            None => Error::e_explain(
                ErrorType::ConnectError,
                "the tunnel stream was already used",
            ),
        }
    }
}

/// Adapts a stream to Pingora's `VirtualSocket` (which must be `Sync`: the mutex provides it
/// and is never contended, since polling goes through `&mut self` and `get_mut`).
struct Socket(Mutex<Box<dyn UpstreamIo>>);

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelSocket")
    }
}

impl Socket {
    fn io(self: Pin<&mut Self>) -> Pin<&mut dyn UpstreamIo> {
        let inner = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        Pin::new(inner.as_mut())
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl VirtualSocket for Socket {
    fn set_socket_option(&self, _opt: VirtualSockOpt) -> std::io::Result<()> {
        // Socket options (nodelay, keepalive) belong to the tunnel's transport, not a stream.
        Ok(())
    }
}
