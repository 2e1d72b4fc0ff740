//! The Connect protocol (v1) with the JSON codec, the subset envd's clients use.
//!
//! - Unary: `POST` with `Content-Type: application/json`, the message as the body; the reply
//!   is the message, or an error status with `{"code","message"}`.
//! - Streaming (server and client): `Content-Type: application/connect+json`; both bodies are
//!   *envelopes*: a flag byte, a 4-byte big-endian length, the JSON message. The server's last
//!   envelope has flag [`END_STREAM`] and carries `{}` or `{"error":{...}}`; the HTTP status
//!   stays 200 once streaming started.
//!
//! Hand-written rather than taken from a crate: the Rust Connect crates (`connectrpc`,
//! `connect-rpc`) bring their own codegen and a `protoc` dependency, while this is ~300 lines
//! over axum that reuse the prost/pbjson types the build already generates.

use std::fmt;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// Envelope flag: the payload is compressed (not supported: we never offer compression).
const COMPRESSED: u8 = 0x01;
/// Envelope flag: the last envelope of a server stream, carrying end-of-stream JSON.
pub const END_STREAM: u8 = 0x02;
/// The largest message accepted in one envelope or unary body.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

pub const UNARY_CONTENT_TYPE: &str = "application/json";
pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";

/// Connect error codes (the ones envd uses), by their wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error reply (Connect's mapping).
    pub fn http_status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// An error answered to a Connect client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub code: Code,
    pub message: String,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// Maps a filesystem error on `what` to the code the SDK expects.
    pub fn from_io(what: &str, error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        let code = match error.kind() {
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::InvalidInput
            | ErrorKind::NotADirectory
            | ErrorKind::IsADirectory
            | ErrorKind::DirectoryNotEmpty
            | ErrorKind::InvalidFilename => Code::InvalidArgument,
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Code::ResourceExhausted,
            _ => Code::Internal,
        };
        Self::new(code, format!("{what}: {error}"))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ConnectError {}

/// A unary error reply.
impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        let mut response = (self.code.http_status(), self.json().to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(UNARY_CONTENT_TYPE),
        );
        response
    }
}

/// The media type of a request, without parameters, lower-cased.
fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Rejects a request whose content type is not `expected` (Connect answers 415).
/// The rejection is boxed: a `Response` is large and this is the cold path.
pub fn check_content_type(headers: &HeaderMap, expected: &str) -> Result<(), Box<Response>> {
    let got = media_type(headers);
    if got == expected {
        return Ok(());
    }
    let message = format!("unsupported content type `{got}`: this method takes `{expected}`");
    Err(Box::new(
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, message).into_response(),
    ))
}

/// Decodes a unary request body.
pub fn decode_unary<T: DeserializeOwned>(body: &[u8]) -> Result<T, ConnectError> {
    // An empty body is the empty message.
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ConnectError::invalid(format!("cannot decode the request message: {e}")))
}

/// A unary reply.
pub fn unary_reply<T: Serialize>(result: Result<T, ConnectError>) -> Response {
    match result.and_then(|message| {
        serde_json::to_vec(&message)
            .map_err(|e| ConnectError::internal(format!("cannot encode the reply: {e}")))
    }) {
        Ok(body) => {
            let mut response = (StatusCode::OK, body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(UNARY_CONTENT_TYPE),
            );
            response
        }
        Err(error) => error.into_response(),
    }
}

/// Reads enveloped messages out of a byte stream that may split them anywhere.
#[derive(Debug, Default)]
pub struct EnvelopeReader {
    buffer: BytesMut,
}

impl EnvelopeReader {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete envelope's (flags, payload), `None` if more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<(u8, Bytes)>, ConnectError> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        let flags = self.buffer[0];
        let length = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]);
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length > MAX_MESSAGE_BYTES {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("message of {length} bytes exceeds the limit of {MAX_MESSAGE_BYTES}"),
            ));
        }
        if flags & COMPRESSED != 0 {
            return Err(ConnectError::new(
                Code::Unimplemented,
                "compressed envelopes are not supported (no Connect-Content-Encoding offered)",
            ));
        }
        if flags & !END_STREAM != 0 {
            return Err(ConnectError::invalid(format!(
                "unknown envelope flags {flags:#04x}"
            )));
        }
        if self.buffer.len() < 5 + length {
            return Ok(None);
        }
        self.buffer.advance(5);
        Ok(Some((flags, self.buffer.split_to(length).freeze())))
    }

    /// Whether bytes of an incomplete envelope are left over.
    pub fn has_partial(&self) -> bool {
        !self.buffer.is_empty()
    }
}

/// Decodes the single enveloped message of a server-streaming request.
pub fn decode_single_envelope<T: DeserializeOwned>(body: &[u8]) -> Result<T, ConnectError> {
    let mut reader = EnvelopeReader::default();
    reader.push(body);
    let Some((flags, payload)) = reader.next_envelope()? else {
        return Err(ConnectError::invalid(
            "the request body is not a complete Connect envelope",
        ));
    };
    if flags & END_STREAM != 0 {
        return Err(ConnectError::invalid(
            "a request envelope must not have the end-stream flag",
        ));
    }
    if reader.has_partial() {
        return Err(ConnectError::invalid(
            "a server-streaming request carries exactly one message",
        ));
    }
    decode_unary(&payload)
}

/// Frames one envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + payload.len());
    frame.put_u8(flags);
    // Payloads we produce are far below 4 GiB; saturate rather than wrap if one were not.
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.extend_from_slice(payload);
    frame.freeze()
}

/// The end-of-stream envelope.
pub fn end_envelope(result: &Result<(), ConnectError>) -> Bytes {
    let body = match result {
        Ok(()) => serde_json::json!({}),
        Err(error) => serde_json::json!({ "error": error.json() }),
    };
    envelope(END_STREAM, body.to_string().as_bytes())
}

/// The sending half of a streaming reply: messages go out as they are sent.
#[derive(Debug, Clone)]
pub struct StreamSender {
    frames: mpsc::Sender<Bytes>,
}

impl StreamSender {
    /// Sends one message; `false` once the client has gone away.
    pub async fn send<T: Serialize>(&self, message: &T) -> bool {
        match serde_json::to_vec(message) {
            Ok(json) => self.frames.send(envelope(0, &json)).await.is_ok(),
            Err(e) => {
                tracing::error!("cannot encode a stream message: {e}");
                false
            }
        }
    }

    /// Ends the stream with success or an error.
    pub async fn finish(self, result: Result<(), ConnectError>) {
        let _ = self.frames.send(end_envelope(&result)).await;
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.frames.closed().await;
    }
}

/// A streaming reply and the sender that feeds it.
pub fn stream_reply() -> (StreamSender, Response) {
    let (frames, receiver) = mpsc::channel::<Bytes>(64);
    let body = Body::from_stream(futures_util::stream::unfold(receiver, |mut rx| async {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, std::convert::Infallible>(frame), rx))
    }));
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(STREAM_CONTENT_TYPE),
    );
    (StreamSender { frames }, response)
}

/// A streaming reply that is only an error (e.g. the request could not be decoded).
pub fn stream_error(error: ConnectError) -> Response {
    let mut response = Response::new(Body::from(end_envelope(&Err(error))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(STREAM_CONTENT_TYPE),
    );
    response
}

/// Runs a unary method: content type, decoding, encoding.
pub async fn unary<Req, Resp, F, Fut>(headers: &HeaderMap, body: &Bytes, method: F) -> Response
where
    Req: serde::de::DeserializeOwned,
    Resp: serde::Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, ConnectError>>,
{
    if let Err(response) = check_content_type(headers, UNARY_CONTENT_TYPE) {
        return *response;
    }
    let result = match decode_unary::<Req>(body) {
        Ok(request) => method(request).await,
        Err(e) => Err(e),
    };
    unary_reply(result)
}

/// Decodes the single request message of a server-streaming method.
pub fn stream_request<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, Box<Response>> {
    check_content_type(headers, STREAM_CONTENT_TYPE)?;
    decode_single_envelope(body).map_err(|e| Box::new(stream_error(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_across_arbitrary_splits() {
        let mut wire = envelope(0, br#"{"a":1}"#).to_vec();
        wire.extend_from_slice(&envelope(END_STREAM, b"{}"));
        for split in 0..wire.len() {
            let mut reader = EnvelopeReader::default();
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                reader.push(part);
                while let Some(envelope) = reader.next_envelope().unwrap() {
                    got.push(envelope);
                }
            }
            assert_eq!(
                got,
                vec![
                    (0, Bytes::from_static(br#"{"a":1}"#)),
                    (END_STREAM, Bytes::from_static(b"{}"))
                ],
                "split at {split}"
            );
            assert!(!reader.has_partial());
        }
    }

    #[test]
    fn bad_envelopes_are_clear_errors() {
        let mut reader = EnvelopeReader::default();
        reader.push(&[COMPRESSED, 0, 0, 0, 1, b'x']);
        assert_eq!(
            reader.next_envelope().unwrap_err().code,
            Code::Unimplemented
        );

        let mut reader = EnvelopeReader::default();
        reader.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            reader.next_envelope().unwrap_err().code,
            Code::ResourceExhausted
        );

        let mut reader = EnvelopeReader::default();
        reader.push(&[0x80, 0, 0, 0, 0]);
        assert_eq!(
            reader.next_envelope().unwrap_err().code,
            Code::InvalidArgument
        );

        let truncated = &envelope(0, b"{}")[..6];
        let error = decode_single_envelope::<serde_json::Value>(truncated).unwrap_err();
        assert_eq!(error.code, Code::InvalidArgument);
        let two = [envelope(0, b"{}"), envelope(0, b"{}")].concat();
        assert!(decode_single_envelope::<serde_json::Value>(&two).is_err());
        assert!(decode_single_envelope::<serde_json::Value>(&envelope(0, b"nope")).is_err());
    }

    #[test]
    fn end_envelope_carries_the_error() {
        let frame = end_envelope(&Err(ConnectError::not_found("no such process")));
        assert_eq!(frame[0], END_STREAM);
        let json: serde_json::Value = serde_json::from_slice(&frame[5..]).unwrap();
        assert_eq!(json["error"]["code"], "not_found");
        assert_eq!(json["error"]["message"], "no such process");
        assert_eq!(&end_envelope(&Ok(()))[5..], b"{}");
    }
}
