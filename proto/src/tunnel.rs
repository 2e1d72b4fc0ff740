//! The tunnel stream protocol: how the gateway reaches a port inside a sandbox through the
//! worker that hosts it.
//!
//! # Shape
//! Each worker dials every gateway and keeps one QUIC connection to it (ALPN [`ALPN`], mutual
//! TLS: the worker presents the client certificate control issued at registration). A worker
//! behind NAT therefore needs no inbound port. For **each proxied client connection** the
//! gateway opens one bidirectional stream on that connection and writes a [`StreamHeader`]
//! naming the sandbox and the port; the worker looks both up in its own sandbox table (the
//! header is a request, never an authority), connects, and answers a [`Status`]. After an
//! [`Status::Ok`] the stream carries raw bytes both ways until each side finishes its half
//! (half-close is honoured: an HTTP client may finish sending its request and still read the
//! response). After any other status the worker finishes the stream and no bytes follow.
//!
//! A stream per connection, instead of a multiplexer of our own, lets QUIC do per-stream flow
//! control: a client that stops reading fills only its own stream's window and never stalls
//! the others on the same connection.
//!
//! # Wire format (all integers big-endian)
//! Header, gateway → worker:
//!
//! | bytes | field |
//! |-------|-------|
//! | 1 | version, [`VERSION`] |
//! | 1 | length `n` of the sandbox id, 1..=[`MAX_SANDBOX_ID_LEN`] |
//! | n | sandbox id, ASCII (a valid [`SandboxId`]) |
//! | 2 | port, 1..=65535 |
//!
//! Status, worker → gateway:
//!
//! | bytes | field |
//! |-------|-------|
//! | 1 | code: 0 ok, 1 sandbox not found, 2 port not open, 3 error |
//! | 2 | length `m` of the message, 0..=[`MAX_MESSAGE_LEN`] |
//! | m | message, UTF-8 (only meaningful with code 3) |
//!
//! Both are tiny and fixed-layout, so they are hand-encoded: a JSON frame would cost more than
//! the header itself and buy nothing; [`VERSION`] leaves room to change the layout.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::ids::{IdError, SandboxId};

/// ALPN protocol id of the tunnel, so that a TLS peer of another kind (the control channel,
/// a browser) cannot be mistaken for a worker's tunnel.
pub const ALPN: &[u8] = b"roost-tunnel/1";

/// The header layout this build writes and reads.
pub const VERSION: u8 = 1;

/// Longest sandbox id a header may carry (ids are at most 43 bytes today; the slack keeps a
/// future id scheme from needing a new version).
pub const MAX_SANDBOX_ID_LEN: usize = 64;

/// Longest status message; longer messages are cut (at a character boundary) when encoded.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// What the gateway asks for on a new stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub sandbox_id: SandboxId,
    pub port: u16,
}

/// Why a header or status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported tunnel header version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("sandbox id length {0} is outside 1..={MAX_SANDBOX_ID_LEN}")]
    SandboxIdLength(usize),
    #[error("sandbox id is not ASCII")]
    SandboxIdNotAscii,
    #[error("invalid sandbox id")]
    SandboxId(#[source] IdError),
    #[error("port 0 is not a valid target")]
    PortZero,
    #[error("unknown status code {0}")]
    UnknownStatus(u8),
    #[error("status message length {0} exceeds {MAX_MESSAGE_LEN}")]
    MessageLength(usize),
    #[error("status message is not UTF-8")]
    MessageNotUtf8,
    #[error("the stream ended inside the {0}")]
    Truncated(&'static str),
    #[error("reading the {what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl StreamHeader {
    pub fn new(sandbox_id: SandboxId, port: u16) -> Self {
        Self { sandbox_id, port }
    }

    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let id = self.sandbox_id.as_str().as_bytes();
        // A SandboxId is at most 43 bytes by construction, so the length fits a u8.
        let len = u8::try_from(id.len()).expect("sandbox ids are shorter than 256 bytes");
        let mut out = Vec::with_capacity(4 + id.len());
        out.push(VERSION);
        out.push(len);
        out.extend_from_slice(id);
        out.extend_from_slice(&self.port.to_be_bytes());
        out
    }

    /// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed, else the
    /// header and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let Some(&len) = buf.get(1) else {
            return Ok(None);
        };
        let len = usize::from(len);
        if len == 0 || len > MAX_SANDBOX_ID_LEN {
            return Err(DecodeError::SandboxIdLength(len));
        }
        let total = 2 + len + 2;
        if buf.len() < total {
            return Ok(None);
        }
        let header = Self::from_parts(&buf[2..2 + len], [buf[2 + len], buf[3 + len]])?;
        Ok(Some((header, total)))
    }

    fn from_parts(id: &[u8], port: [u8; 2]) -> Result<Self, DecodeError> {
        let id = std::str::from_utf8(id)
            .ok()
            .filter(|s| s.is_ascii())
            .ok_or(DecodeError::SandboxIdNotAscii)?;
        let sandbox_id = id.parse().map_err(DecodeError::SandboxId)?;
        let port = u16::from_be_bytes(port);
        if port == 0 {
            return Err(DecodeError::PortZero);
        }
        Ok(Self { sandbox_id, port })
    }

    /// Reads exactly one header from `reader`, leaving whatever follows unread.
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, DecodeError> {
        const WHAT: &str = "tunnel header";
        let mut start = [0u8; 2];
        read_exact(reader, &mut start, WHAT).await?;
        if start[0] != VERSION {
            return Err(DecodeError::UnsupportedVersion(start[0]));
        }
        let len = usize::from(start[1]);
        if len == 0 || len > MAX_SANDBOX_ID_LEN {
            return Err(DecodeError::SandboxIdLength(len));
        }
        let mut rest = [0u8; MAX_SANDBOX_ID_LEN + 2];
        let rest = &mut rest[..len + 2];
        read_exact(reader, rest, WHAT).await?;
        Self::from_parts(&rest[..len], [rest[len], rest[len + 1]])
    }
}

/// The worker's answer to a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Connected: raw bytes follow both ways.
    Ok,
    /// This worker holds no such sandbox (moved, paused, gone, or never here).
    SandboxNotFound,
    /// The sandbox exists but nothing accepts connections on that port.
    PortClosed,
    /// Anything else (the VM did not answer, the header was malformed, ...).
    Error(String),
}

impl Status {
    fn code(&self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::SandboxNotFound => 1,
            Self::PortClosed => 2,
            Self::Error(_) => 3,
        }
    }

    /// The status's bytes; an error message longer than [`MAX_MESSAGE_LEN`] is cut.
    pub fn encode(&self) -> Vec<u8> {
        let message = match self {
            Self::Error(message) => truncate(message, MAX_MESSAGE_LEN),
            _ => "",
        };
        let len = u16::try_from(message.len()).expect("MAX_MESSAGE_LEN fits a u16");
        let mut out = Vec::with_capacity(3 + message.len());
        out.push(self.code());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(message.as_bytes());
        out
    }

    /// Parses a status at the start of `buf`: `Ok(None)` when more bytes are needed, else the
    /// status and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        if buf.len() < 3 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
        check_status_start(buf[0], len)?;
        if buf.len() < 3 + len {
            return Ok(None);
        }
        Ok(Some((Self::from_parts(buf[0], &buf[3..3 + len])?, 3 + len)))
    }

    fn from_parts(code: u8, message: &[u8]) -> Result<Self, DecodeError> {
        let message = std::str::from_utf8(message).map_err(|_| DecodeError::MessageNotUtf8)?;
        Ok(match code {
            0 => Self::Ok,
            1 => Self::SandboxNotFound,
            2 => Self::PortClosed,
            3 => Self::Error(message.to_owned()),
            other => return Err(DecodeError::UnknownStatus(other)),
        })
    }

    /// Reads exactly one status from `reader`, leaving whatever follows unread.
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, DecodeError> {
        const WHAT: &str = "tunnel status";
        let mut start = [0u8; 3];
        read_exact(reader, &mut start, WHAT).await?;
        let len = usize::from(u16::from_be_bytes([start[1], start[2]]));
        check_status_start(start[0], len)?;
        let mut message = vec![0u8; len];
        read_exact(reader, &mut message, WHAT).await?;
        Self::from_parts(start[0], &message)
    }
}

fn check_status_start(code: u8, len: usize) -> Result<(), DecodeError> {
    if code > 3 {
        return Err(DecodeError::UnknownStatus(code));
    }
    if len > MAX_MESSAGE_LEN {
        return Err(DecodeError::MessageLength(len));
    }
    Ok(())
}

/// The longest prefix of `s` of at most `max` bytes that ends at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), DecodeError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(DecodeError::Truncated(what)),
        Err(source) => Err(DecodeError::Io { what, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SandboxId {
        "cl-abc123".parse().unwrap()
    }

    #[test]
    fn header_round_trips_and_reports_its_length() {
        let header = StreamHeader::new(id(), 49983);
        let mut bytes = header.encode();
        assert_eq!(bytes.len(), 2 + 9 + 2);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (decoded, used) = StreamHeader::decode(&bytes).unwrap().unwrap();
        assert_eq!(decoded, header);
        assert_eq!(&bytes[used..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let bytes = StreamHeader::new(id(), 80).encode();
        for end in 0..bytes.len() {
            assert!(
                StreamHeader::decode(&bytes[..end]).unwrap().is_none(),
                "{end}"
            );
        }
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let good = StreamHeader::new(id(), 80).encode();
        let mut version = good.clone();
        version[0] = 2;
        assert!(matches!(
            StreamHeader::decode(&version),
            Err(DecodeError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            StreamHeader::decode(&[VERSION, 0]),
            Err(DecodeError::SandboxIdLength(0))
        ));
        assert!(matches!(
            StreamHeader::decode(&[VERSION, 65]),
            Err(DecodeError::SandboxIdLength(65))
        ));
        let mut port_zero = good.clone();
        let n = port_zero.len();
        port_zero[n - 2..].copy_from_slice(&[0, 0]);
        assert!(matches!(
            StreamHeader::decode(&port_zero),
            Err(DecodeError::PortZero)
        ));
        let mut bad_id = vec![VERSION, 9];
        bad_id.extend_from_slice(b"cl-ABC123");
        bad_id.extend_from_slice(&80u16.to_be_bytes());
        assert!(matches!(
            StreamHeader::decode(&bad_id),
            Err(DecodeError::SandboxId(IdError::InvalidCharacter('A')))
        ));
        let mut traversal = vec![VERSION, 5];
        traversal.extend_from_slice(b"../..");
        traversal.extend_from_slice(&80u16.to_be_bytes());
        assert!(matches!(
            StreamHeader::decode(&traversal),
            Err(DecodeError::SandboxId(IdError::MissingPrefix))
        ));
        let mut not_ascii = vec![VERSION, 4];
        not_ascii.extend_from_slice("cl-é".as_bytes());
        not_ascii.extend_from_slice(&80u16.to_be_bytes());
        assert!(matches!(
            StreamHeader::decode(&not_ascii),
            Err(DecodeError::SandboxIdNotAscii)
        ));
    }

    #[test]
    fn statuses_round_trip() {
        for status in [
            Status::Ok,
            Status::SandboxNotFound,
            Status::PortClosed,
            Status::Error("the VM did not answer".into()),
        ] {
            let bytes = status.encode();
            let (decoded, used) = Status::decode(&bytes).unwrap().unwrap();
            assert_eq!(decoded, status);
            assert_eq!(used, bytes.len());
            for end in 0..bytes.len() {
                assert!(Status::decode(&bytes[..end]).unwrap().is_none());
            }
        }
    }

    #[test]
    fn long_error_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let bytes = Status::Error(long).encode();
        let (Status::Error(message), _) = Status::decode(&bytes).unwrap().unwrap() else {
            panic!("not an error status");
        };
        assert_eq!(message.len(), MAX_MESSAGE_LEN);
        assert!(message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn malformed_statuses_are_typed_errors() {
        assert!(matches!(
            Status::decode(&[9, 0, 0]),
            Err(DecodeError::UnknownStatus(9))
        ));
        assert!(matches!(
            Status::decode(&[3, 0xff, 0xff]),
            Err(DecodeError::MessageLength(65535))
        ));
        assert!(matches!(
            Status::decode(&[3, 0, 2, 0xc3, 0x28]),
            Err(DecodeError::MessageNotUtf8)
        ));
    }

    #[tokio::test]
    async fn async_reads_take_exactly_one_message() {
        let mut bytes = StreamHeader::new(id(), 8080).encode();
        bytes.extend_from_slice(&Status::Error("x".into()).encode());
        bytes.extend_from_slice(b"rest");
        let mut reader = &bytes[..];
        let header = StreamHeader::read(&mut reader).await.unwrap();
        assert_eq!(header.port, 8080);
        assert_eq!(
            Status::read(&mut reader).await.unwrap(),
            Status::Error("x".into())
        );
        assert_eq!(reader, b"rest");
    }

    #[tokio::test]
    async fn a_stream_that_ends_early_is_truncated() {
        let bytes = StreamHeader::new(id(), 8080).encode();
        let mut reader = &bytes[..bytes.len() - 1];
        assert!(matches!(
            StreamHeader::read(&mut reader).await,
            Err(DecodeError::Truncated("tunnel header"))
        ));
        let mut reader = &[1u8, 0xff][..];
        assert!(matches!(
            StreamHeader::read(&mut reader).await,
            Err(DecodeError::SandboxIdLength(255))
        ));
        let mut reader = &[3u8, 0, 5, b'a'][..];
        assert!(matches!(
            Status::read(&mut reader).await,
            Err(DecodeError::Truncated("tunnel status"))
        ));
    }
}
