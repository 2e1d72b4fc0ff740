//! Streaming files out of and into the guest.

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use roost_proto::agent::{
    AgentMessage, ClientMessage, Frame, MAX_CHUNK_LEN, Operation, ReadFileRequest, StreamKind,
    WriteFileRequest,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{AgentClient, Conn, Error, expect, unexpected};

/// A file being read from the guest, chunk by chunk.
#[derive(Debug)]
pub struct FileDownload {
    /// Size when the agent opened it (a file growing meanwhile streams what it has when read).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    conn: Conn,
    received: u64,
    done: bool,
}

impl AgentClient {
    /// Opens `path` (absolute) in the guest for reading.
    pub async fn read_file(&self, path: &str) -> Result<FileDownload, Error> {
        let mut conn = self
            .open(Operation::ReadFile(ReadFileRequest { path: path.into() }))
            .await?;
        match expect(&mut conn, "file info").await? {
            AgentMessage::FileInfo { size, mode } => Ok(FileDownload {
                size,
                mode,
                conn,
                received: 0,
                done: false,
            }),
            other => Err(unexpected("file info", &other)),
        }
    }

    /// Copies the guest file `path` into `to`; returns the bytes copied.
    pub async fn read_file_into<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        to: &mut W,
    ) -> Result<u64, Error> {
        let mut download = self.read_file(path).await?;
        while let Some(chunk) = download.next_chunk().await? {
            to.write_all(&chunk).await?;
        }
        to.flush().await?;
        Ok(download.received)
    }

    /// Writes everything `from` yields to the guest file `request.path` (created or
    /// truncated); returns the bytes written, as confirmed by the agent.
    pub async fn write_file<R: AsyncRead + Unpin>(
        &self,
        request: WriteFileRequest,
        from: &mut R,
    ) -> Result<u64, Error> {
        let mut conn = self.open(Operation::WriteFile(request)).await?;
        match expect(&mut conn, "accepted").await? {
            AgentMessage::Accepted => {}
            other => return Err(unexpected("accepted", &other)),
        }
        let mut sent: u64 = 0;
        if let Err(e) = stream_into(&mut conn, from, &mut sent).await {
            // The agent may have stopped us with a reason (disk full, ...): prefer it.
            return match expect(&mut conn, "done").await {
                Err(agent @ Error::Agent(_)) => Err(agent),
                _ => Err(e),
            };
        }
        match expect(&mut conn, "done").await? {
            AgentMessage::Done { bytes } if bytes == sent => Ok(bytes),
            AgentMessage::Done { bytes } => Err(Error::Unexpected {
                expected: "the bytes sent to be written",
                got: format!("{bytes} of {sent} bytes written"),
            }),
            other => Err(unexpected("done", &other)),
        }
    }
}

async fn stream_into<R: AsyncRead + Unpin>(
    conn: &mut Conn,
    from: &mut R,
    sent: &mut u64,
) -> Result<(), Error> {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(MAX_CHUNK_LEN);
        let n = (&mut *from)
            .take(u64::try_from(MAX_CHUNK_LEN).unwrap_or(u64::MAX))
            .read_buf(&mut buf)
            .await?;
        if n == 0 {
            break;
        }
        *sent += u64::try_from(n).unwrap_or(u64::MAX);
        conn.send(Frame::<ClientMessage>::Data(
            StreamKind::File,
            buf.split().freeze(),
        ))
        .await?;
    }
    conn.send(Frame::Message(ClientMessage::End)).await?;
    Ok(())
}

impl FileDownload {
    /// The next chunk; `None` once the agent confirmed the end (and the byte count matched).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Error> {
        if self.done {
            return Ok(None);
        }
        match self.conn.next().await {
            None => Err(Error::Closed("the end of the file")),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(Frame::Data(StreamKind::File, bytes))) => {
                self.received += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                Ok(Some(bytes))
            }
            Some(Ok(Frame::Message(AgentMessage::Done { bytes }))) => {
                if bytes != self.received {
                    return Err(Error::Unexpected {
                        expected: "the announced byte count",
                        got: format!("{bytes} announced, {} received", self.received),
                    });
                }
                self.done = true;
                Ok(None)
            }
            Some(Ok(Frame::Message(AgentMessage::Error(reply)))) => Err(Error::Agent(reply)),
            Some(Ok(Frame::Message(other))) => Err(unexpected("file data", &other)),
            Some(Ok(Frame::Data(kind, _))) => Err(Error::Unexpected {
                expected: "file data",
                got: format!("{kind:?} data"),
            }),
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}
