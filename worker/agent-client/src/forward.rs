//! Port forwarding: a raw byte stream to `127.0.0.1:PORT` inside the guest, or to the envd
//! API's private init socket.

use std::io;

use bytes::BytesMut;
use roost_proto::agent::{
    AgentMessage, ForwardRequest, Frame, FrameCodec, MAX_FRAME_LEN, Operation, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::codec::{Decoder, Encoder};

use crate::{AgentClient, Error, unexpected};

impl AgentClient {
    /// Connects to `127.0.0.1:port` in the guest. The returned stream carries the TCP
    /// connection's bytes both ways; dropping it closes that connection.
    pub async fn forward_port(&self, port: u16) -> Result<UnixStream, Error> {
        self.forward(ForwardRequest::Tcp { port }).await
    }

    /// Connects to the envd API's private init socket in the guest (the one that serves
    /// `POST /init`; see [`AgentClient::init_sandbox`]). Needs protocol version 2: an older
    /// agent refuses with [`roost_proto::agent::ErrorKind::UnsupportedVersion`].
    pub async fn forward_envd_init(&self) -> Result<UnixStream, Error> {
        self.forward(ForwardRequest::EnvdInit).await
    }

    /// Sends a forward request and returns the stream once the agent has connected.
    async fn forward(&self, request: ForwardRequest) -> Result<UnixStream, Error> {
        let mut stream = self.connector.connect().await?;
        let mut codec = FrameCodec::<AgentMessage>::new();
        let mut out = BytesMut::new();
        codec.encode(
            Frame::Message(Request::new(Operation::Forward(request))),
            &mut out,
        )?;
        stream.write_all(&out).await?;
        // Read exactly one frame: the bytes after it already belong to the guest's server.
        let mut prefix = [0u8; 4];
        read_exact(&mut stream, &mut prefix).await?;
        let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
        if len > MAX_FRAME_LEN {
            return Err(roost_proto::agent::FrameError::TooLarge { len }.into());
        }
        let mut frame = BytesMut::zeroed(4 + len);
        frame[..4].copy_from_slice(&prefix);
        read_exact(&mut stream, &mut frame[4..]).await?;
        match codec.decode(&mut frame)? {
            Some(Frame::Message(AgentMessage::Connected)) => Ok(stream),
            Some(Frame::Message(AgentMessage::Error(reply))) => Err(Error::Agent(reply)),
            Some(Frame::Message(other)) => Err(unexpected("connected", &other)),
            Some(Frame::Data(kind, _)) => Err(Error::Unexpected {
                expected: "connected",
                got: format!("{kind:?} data"),
            }),
            None => Err(Error::Closed("connected")),
        }
    }

    /// Accepts connections on `listener` and forwards each to guest `port`, until the task is
    /// aborted. A connection the agent cannot forward (nothing listens) is closed at once.
    pub fn serve_forward(&self, listener: TcpListener, port: u16) -> JoinHandle<()> {
        let client = self.clone();
        tokio::spawn(async move {
            loop {
                let mut tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection to forward failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let client = client.clone();
                tokio::spawn(async move {
                    match client.forward_port(port).await {
                        Ok(mut guest) => {
                            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut guest).await;
                        }
                        Err(e) => tracing::warn!(port, "cannot forward a connection: {e}"),
                    }
                });
            }
        })
    }
}

/// `read_exact` whose early end is [`Error::Closed`].
async fn read_exact(stream: &mut UnixStream, buf: &mut [u8]) -> Result<(), Error> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::Closed("connected")),
        Err(e) => Err(e.into()),
    }
}
