//! The handshake between a VMM and its page server over a Unix stream socket.
//!
//! The VMM connects, sends one JSON line describing its guest RAM regions together with the
//! userfaultfd (`SCM_RIGHTS`, on the same `sendmsg`), and reads one JSON reply line. After that
//! the connection stays open for the VM's life and carries nothing but, at most, one final
//! error line from the server: the VMM treats end-of-file as the page server's death.

use std::io::{self, BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// Protocol version; the server refuses others.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest handshake line accepted.
const MAX_LINE: usize = 64 << 10;

/// One guest RAM region registered with the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Start of the region in the VMM's address space.
    pub host_addr: u64,
    /// Length in bytes (a whole number of pages).
    pub len: u64,
    /// Where the region starts in the chain (byte offset).
    pub chain_offset: u64,
}

/// VMM → server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    pub version: u32,
    pub page_size: u32,
    /// The chain the VMM's state file expects (SHA-256 hex of `memory.hdr`).
    pub header_sha256: String,
    pub regions: Vec<Region>,
}

/// Server → VMM, once; `error` also ends a connection when the server fails later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("page server socket I/O failed")]
    Io(#[from] io::Error),
    #[error("could not pass the userfaultfd over the socket")]
    Sendmsg(#[source] nix::Error),
    #[error("the handshake carried no userfaultfd")]
    NoFd,
    #[error("malformed handshake message")]
    Json(#[from] serde_json::Error),
    #[error("the peer closed the connection during the handshake")]
    Closed,
    #[error("handshake line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the page server refused: {0}")]
    Refused(String),
}

/// Sends the handshake and the userfaultfd `uffd` (VMM side).
pub fn send_handshake(
    stream: &UnixStream,
    handshake: &Handshake,
    uffd: RawFd,
) -> Result<(), ProtocolError> {
    let mut line = serde_json::to_vec(handshake)?;
    line.push(b'\n');
    let fds = [uffd];
    let iov = [io::IoSlice::new(&line)];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(ProtocolError::Sendmsg)?;
    if sent < line.len() {
        // The fd went with the first bytes; the rest is plain stream data.
        (&*stream).write_all(&line[sent..])?;
    }
    Ok(())
}

/// Receives the handshake and the userfaultfd (server side).
pub fn recv_handshake(stream: &UnixStream) -> Result<(Handshake, OwnedFd), ProtocolError> {
    let mut buf = vec![0u8; MAX_LINE];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
    let mut fd = None;
    let mut line = Vec::new();
    loop {
        let n = {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| ProtocolError::Io(e.into()))?;
            for c in msg.cmsgs().map_err(|e| ProtocolError::Io(e.into()))? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just installed `raw` in this process for us; nothing
                        // else owns it.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
            }
            msg.bytes
        };
        if n == 0 {
            return Err(ProtocolError::Closed);
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_LINE {
            return Err(ProtocolError::TooLong);
        }
    }
    let handshake = serde_json::from_slice(&line)?;
    Ok((handshake, fd.ok_or(ProtocolError::NoFd)?))
}

/// Writes one reply line.
pub fn send_reply(mut stream: &UnixStream, reply: &Reply) -> Result<(), ProtocolError> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

/// Reads one reply line; an `ok: false` reply becomes [`ProtocolError::Refused`].
pub fn recv_reply<R: BufRead>(reader: &mut R) -> Result<(), ProtocolError> {
    let mut line = String::new();
    let n = std::io::Read::take(reader, MAX_LINE as u64).read_line(&mut line)?;
    if n == 0 {
        return Err(ProtocolError::Closed);
    }
    let reply: Reply = serde_json::from_str(line.trim_end())?;
    if reply.ok {
        Ok(())
    } else {
        Err(ProtocolError::Refused(
            reply.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}
