//! Length-prefixed JSON messages: a `u32` big-endian length, then that many bytes of JSON.
//!
//! [`JsonCodec`] plugs into `tokio_util::codec::{FramedRead, FramedWrite}` over a QUIC stream.
//! The length handling is `tokio_util`'s `LengthDelimitedCodec` (configured with
//! [`super::MAX_MESSAGE_LEN`], so an oversized prefix is refused before anything is buffered);
//! this module only adds the typed JSON layer and a typed error for the oversized case.

use std::io;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use super::MAX_MESSAGE_LEN;

/// A message could not be read or written. Any of these leaves the stream unusable.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message exceeds the limit of {MAX_MESSAGE_LEN} bytes")]
    TooLarge,
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
    #[error("stream failed")]
    Io(#[source] io::Error),
}

impl From<io::Error> for CodecError {
    fn from(e: io::Error) -> Self {
        // LengthDelimitedCodec reports an oversized frame as InvalidData; nothing else in it
        // (or in a QUIC stream) uses that kind.
        if e.kind() == io::ErrorKind::InvalidData {
            Self::TooLarge
        } else {
            Self::Io(e)
        }
    }
}

/// Decodes messages of type `In` and encodes messages of type `Out`.
#[derive(Debug)]
pub struct JsonCodec<In, Out> {
    inner: LengthDelimitedCodec,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for JsonCodec<In, Out> {
    fn default() -> Self {
        Self {
            inner: LengthDelimitedCodec::builder()
                .length_field_length(4)
                .big_endian()
                .max_frame_length(MAX_MESSAGE_LEN)
                .new_codec(),
            _types: PhantomData,
        }
    }
}

impl<In, Out> JsonCodec<In, Out> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<In: DeserializeOwned, Out> Decoder for JsonCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.inner.decode(src)? {
            Some(body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(CodecError::Malformed),
            None => Ok(None),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for JsonCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, message: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let body = serde_json::to_vec(&message).map_err(CodecError::Malformed)?;
        if body.len() > MAX_MESSAGE_LEN {
            return Err(CodecError::TooLarge);
        }
        self.inner.encode(Bytes::from(body), dst)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ControlMessage, WorkerMessage};

    type WorkerSide = JsonCodec<ControlMessage, WorkerMessage>;
    type ControlSide = JsonCodec<WorkerMessage, ControlMessage>;

    #[test]
    fn round_trips_through_the_length_prefix() {
        let msg = ControlMessage::Welcome {
            protocol_version: 1,
            heartbeat_interval_ms: 5000,
        };
        let mut buf = BytesMut::new();
        ControlSide::new().encode(msg.clone(), &mut buf).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap());
        assert_eq!(usize::try_from(len).unwrap(), buf.len() - 4);
        let decoded = WorkerSide::new().decode(&mut buf).unwrap();
        assert_eq!(decoded, Some(msg));
        assert!(buf.is_empty());
    }

    #[test]
    fn waits_for_a_whole_message() {
        let mut buf = BytesMut::new();
        ControlSide::new()
            .encode(ControlMessage::Rejected { reason: "x".into() }, &mut buf)
            .unwrap();
        let mut partial = buf.split_to(buf.len() - 1);
        assert!(WorkerSide::new().decode(&mut partial).unwrap().is_none());
    }

    #[test]
    fn refuses_an_oversized_prefix_before_buffering() {
        let mut buf = BytesMut::new();
        let too_big = u32::try_from(MAX_MESSAGE_LEN + 1).unwrap();
        buf.extend_from_slice(&too_big.to_be_bytes());
        assert!(matches!(
            WorkerSide::new().decode(&mut buf),
            Err(CodecError::TooLarge)
        ));
    }

    #[test]
    fn refuses_malformed_json() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&3u32.to_be_bytes());
        buf.extend_from_slice(b"{x}");
        assert!(matches!(
            WorkerSide::new().decode(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }
}
