//! Length-prefixed frames: `u32` big-endian body length, then the body: a one-byte tag and
//! the payload. Tag 0 is a JSON control message; tags 1–4 carry raw bytes of one stream.
//!
//! [`FrameCodec`] plugs into `tokio_util::codec::Framed`; it refuses (without buffering) any
//! length prefix above [`MAX_FRAME_LEN`], so a peer cannot make the other side allocate more.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

use super::MAX_FRAME_LEN;

const LENGTH_PREFIX: usize = 4;
const TAG_MESSAGE: u8 = 0;

/// One frame: a control message of type `M`, or a chunk of one byte stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<M> {
    Message(M),
    Data(StreamKind, Bytes),
}

/// Which byte stream a data frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Client → agent: the exec'd process's stdin.
    Stdin,
    Stdout,
    Stderr,
    /// File content, either direction.
    File,
}

impl StreamKind {
    fn tag(self) -> u8 {
        match self {
            Self::Stdin => 1,
            Self::Stdout => 2,
            Self::Stderr => 3,
            Self::File => 4,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            1 => Self::Stdin,
            2 => Self::Stdout,
            3 => Self::Stderr,
            4 => Self::File,
            _ => return None,
        })
    }
}

/// A frame could not be read or written. After any of these but [`FrameError::Io`] the
/// connection is out of sync or unusable: answer with an error message and close.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge { len: usize },
    #[error("empty frame (no tag byte)")]
    Empty,
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("the connection ended in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    #[error("malformed control message")]
    BadMessage(#[source] serde_json::Error),
    #[error("connection failed")]
    Io(#[from] std::io::Error),
}

/// Decodes frames whose messages are `D` and encodes frames with any serialisable message.
///
/// Written out rather than wrapping `tokio_util`'s `LengthDelimitedCodec`: that codec reports
/// an oversized prefix as an untyped `io::Error`, and the agent must tell that case apart to
/// answer [`super::ErrorKind::FrameTooLarge`]; the length logic itself is ten lines.
#[derive(Debug)]
pub struct FrameCodec<D> {
    decodes: PhantomData<fn() -> D>,
}

impl<D> FrameCodec<D> {
    pub fn new() -> Self {
        Self {
            decodes: PhantomData,
        }
    }

    /// The same codec decoding another message type (for `Framed::map_codec` once the
    /// request has been read). The codec holds no state, so nothing is lost.
    pub fn retype<E>(self) -> FrameCodec<E> {
        FrameCodec::new()
    }
}

impl<D> Default for FrameCodec<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: DeserializeOwned> Decoder for FrameCodec<D> {
    type Item = Frame<D>;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame<D>>, FrameError> {
        let Some(prefix) = src.get(..LENGTH_PREFIX) else {
            return Ok(None);
        };
        let len = usize::try_from(u32::from_be_bytes([
            prefix[0], prefix[1], prefix[2], prefix[3],
        ]))
        .unwrap_or(usize::MAX);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge { len });
        }
        if src.len() < LENGTH_PREFIX + len {
            src.reserve(LENGTH_PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        let mut body = src.split_to(len);
        if body.is_empty() {
            return Err(FrameError::Empty);
        }
        let tag = body.get_u8();
        if tag == TAG_MESSAGE {
            return serde_json::from_slice(&body)
                .map(|m| Some(Frame::Message(m)))
                .map_err(FrameError::BadMessage);
        }
        let kind = StreamKind::from_tag(tag).ok_or(FrameError::UnknownTag(tag))?;
        Ok(Some(Frame::Data(kind, body.freeze())))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame<D>>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(src.len())),
        }
    }
}

impl<D, E: Serialize> Encoder<Frame<E>> for FrameCodec<D> {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame<E>, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        dst.put_u32(0); // patched below
        match frame {
            Frame::Message(message) => {
                dst.put_u8(TAG_MESSAGE);
                if let Err(e) = serde_json::to_writer((&mut *dst).writer(), &message) {
                    dst.truncate(start);
                    return Err(FrameError::BadMessage(e));
                }
            }
            Frame::Data(kind, bytes) => {
                dst.reserve(1 + bytes.len());
                dst.put_u8(kind.tag());
                dst.extend_from_slice(&bytes);
            }
        }
        let len = dst.len() - start - LENGTH_PREFIX;
        if len > MAX_FRAME_LEN {
            dst.truncate(start);
            return Err(FrameError::TooLarge { len });
        }
        let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len })?;
        dst[start..start + LENGTH_PREFIX].copy_from_slice(&prefix.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AgentMessage, ClientMessage};
    use super::*;

    fn encode(frame: Frame<AgentMessage>) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::<AgentMessage>::new()
            .encode(frame, &mut buf)
            .unwrap();
        buf
    }

    #[test]
    fn messages_and_data_round_trip_even_when_split_anywhere() {
        let frames = vec![
            Frame::Message(AgentMessage::Started { pid: 7 }),
            Frame::Data(StreamKind::Stdout, Bytes::from_static(b"hello\n")),
            Frame::Data(StreamKind::Stderr, Bytes::new()),
            Frame::Message(AgentMessage::Done { bytes: 1 << 40 }),
        ];
        let mut wire = BytesMut::new();
        for frame in frames.clone() {
            wire.extend_from_slice(&encode(frame));
        }
        for split in 0..wire.len() {
            let mut codec = FrameCodec::<AgentMessage>::new();
            let mut buf = BytesMut::from(&wire[..split]);
            let mut decoded = Vec::new();
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                decoded.push(frame);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                decoded.push(frame);
            }
            assert_eq!(decoded, frames, "split at {split}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn wire_layout_is_length_tag_payload() {
        let wire = encode(Frame::Data(StreamKind::File, Bytes::from_static(b"ab")));
        assert_eq!(&wire[..], &[0, 0, 0, 3, 4, b'a', b'b']);
        let wire = encode(Frame::Message(AgentMessage::Accepted));
        assert_eq!(&wire[4..], b"\0{\"type\":\"accepted\"}");
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_buffering() {
        let mut codec = FrameCodec::<ClientMessage>::new();
        let too_big = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
        let mut buf = BytesMut::from(&too_big.to_be_bytes()[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { len }) if len == MAX_FRAME_LEN + 1
        ));
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_frame_of_exactly_the_limit_is_accepted() {
        let payload = Bytes::from(vec![7u8; MAX_FRAME_LEN - 1]);
        let wire = encode(Frame::Data(StreamKind::Stdout, payload.clone()));
        let mut buf = wire;
        let frame = FrameCodec::<AgentMessage>::new()
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(frame, Frame::Data(StreamKind::Stdout, payload));
        let mut buf = BytesMut::new();
        let over = Bytes::from(vec![0u8; MAX_FRAME_LEN]);
        assert!(matches!(
            FrameCodec::<AgentMessage>::new().encode(
                Frame::<AgentMessage>::Data(StreamKind::Stdout, over),
                &mut buf
            ),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(buf.is_empty(), "a refused frame leaves nothing behind");
    }

    #[test]
    fn a_connection_ending_mid_frame_is_truncated() {
        let mut codec = FrameCodec::<ClientMessage>::new();
        let mut buf = BytesMut::from(&[0, 0, 0, 9, 0, b'{'][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated(6))
        ));
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }

    #[test]
    fn malformed_bodies_are_errors() {
        type Check = fn(&FrameError) -> bool;
        let cases: [(&[u8], Check); 3] = [
            (&[0, 0, 0, 0], |e| matches!(e, FrameError::Empty)),
            (&[0, 0, 0, 1, 9], |e| matches!(e, FrameError::UnknownTag(9))),
            (&[0, 0, 0, 3, 0, b'{', b'x'], |e| {
                matches!(e, FrameError::BadMessage(_))
            }),
        ];
        for (wire, expected) in cases {
            let mut buf = BytesMut::from(wire);
            let error = FrameCodec::<ClientMessage>::new()
                .decode(&mut buf)
                .unwrap_err();
            assert!(expected(&error), "{wire:?}: {error:?}");
        }
    }
}
