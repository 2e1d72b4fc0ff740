//! Framing of the state file `vm.state`: a fixed header that says what the file is, which
//! format version wrote it, how long the payload is and its SHA-256, then the payload (JSON of
//! [`super::VmSnapshot`]).
//!
//! ```text
//! offset  size  field
//!      0     8  magic "ROOSTVMS"
//!      8     4  format version, u32 little endian
//!     12     4  reserved, zero
//!     16     8  payload length in bytes, u64 little endian
//!     24    32  SHA-256 of the payload
//!     56     …  payload
//! ```
//!
//! Reading refuses, each with its own error: a file too short for the header, another magic,
//! a version this build does not read, a payload longer than [`MAX_PAYLOAD`], a file shorter or
//! longer than the header says, a checksum mismatch, and a payload that does not decode.
//! Nothing in the payload is trusted before the checksum matched.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"ROOSTVMS";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 56;
/// Largest payload accepted (a 16-vCPU VM's state is well under 1 MiB).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Why a state file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("could not encode the VM state")]
    Encode(#[source] serde_json::Error),
    #[error("the encoded VM state is {0} bytes, more than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("could not write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("could not read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is truncated: {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TruncatedHeader { path: PathBuf, len: u64 },
    #[error("{path} is not a Roost VM state file (magic {found:02x?})")]
    BadMagic { path: PathBuf, found: [u8; 8] },
    #[error(
        "{path} has state format version {found}; this build reads version {FORMAT_VERSION} \
         (take the snapshot again with this build)"
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path} declares a {len}-byte payload, more than the {MAX_PAYLOAD}-byte limit")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path} is truncated: the header declares {expected} payload bytes, {found} present")]
    TruncatedPayload {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path} has {extra} bytes after the declared payload")]
    TrailingBytes { path: PathBuf, extra: u64 },
    #[error("{path} is corrupted: the payload's SHA-256 does not match the header")]
    ChecksumMismatch { path: PathBuf },
    #[error("{path} has a valid checksum but its payload does not decode")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The header of a payload.
fn header(payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let len = u64::try_from(payload.len()).unwrap_or(u64::MAX);
    out[16..24].copy_from_slice(&len.to_le_bytes());
    out[24..56].copy_from_slice(&Sha256::digest(payload));
    out
}

/// Frames `value` into bytes (header + JSON payload).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WriteError> {
    let payload = serde_json::to_vec(value).map_err(WriteError::Encode)?;
    let len = u64::try_from(payload.len()).unwrap_or(u64::MAX);
    if len > MAX_PAYLOAD {
        return Err(WriteError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Writes `value` to `path` atomically (a temporary file in the same directory, fsync,
/// rename); returns the file's size.
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<u64, WriteError> {
    let bytes = encode(value)?;
    let io = |source| WriteError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("state.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(u64::try_from(bytes.len()).unwrap_or(u64::MAX))
}

/// Checks the framing of `bytes` (read from `path`, for messages) and decodes the payload.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, ReadError> {
    let path = || path.to_owned();
    let file_len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let Some((head, payload)) = bytes.split_at_checked(HEADER_LEN) else {
        return Err(ReadError::TruncatedHeader {
            path: path(),
            len: file_len,
        });
    };
    let field = |range: std::ops::Range<usize>| &head[range];
    let magic: [u8; 8] = field(0..8).try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(ReadError::BadMagic {
            path: path(),
            found: magic,
        });
    }
    let version = u32::from_le_bytes(field(8..12).try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(ReadError::UnsupportedVersion {
            path: path(),
            found: version,
        });
    }
    let len = u64::from_le_bytes(field(16..24).try_into().unwrap_or_default());
    if len > MAX_PAYLOAD {
        return Err(ReadError::TooLarge { path: path(), len });
    }
    let found = u64::try_from(payload.len()).unwrap_or(u64::MAX);
    if found < len {
        return Err(ReadError::TruncatedPayload {
            path: path(),
            expected: len,
            found,
        });
    }
    if found > len {
        return Err(ReadError::TrailingBytes {
            path: path(),
            extra: found - len,
        });
    }
    if Sha256::digest(payload).as_slice() != field(24..56) {
        return Err(ReadError::ChecksumMismatch { path: path() });
    }
    serde_json::from_slice(payload).map_err(|source| ReadError::Decode {
        path: path(),
        source,
    })
}

/// Reads and checks the state file at `path` (at most header + [`MAX_PAYLOAD`] bytes are read).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let limit = u64::try_from(HEADER_LEN).unwrap_or(u64::MAX) + MAX_PAYLOAD + 1;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).map_err(io)?;
    decode(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            values: (0..100).collect(),
        }
    }

    fn p() -> &'static Path {
        Path::new("vm.state")
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        write(&path, &sample()).unwrap();
        assert_eq!(read::<Sample>(&path).unwrap(), sample());
        assert!(!dir.path().join("vm.state.tmp").exists());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"ROOSTVMS");
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for cut in [0, 7, HEADER_LEN - 1] {
            let err = decode::<Sample>(p(), &bytes[..cut]).unwrap_err();
            assert!(matches!(err, ReadError::TruncatedHeader { .. }), "{err}");
        }
        for cut in [HEADER_LEN, HEADER_LEN + 1, bytes.len() - 1] {
            let err = decode::<Sample>(p(), &bytes[..cut]).unwrap_err();
            assert!(matches!(err, ReadError::TruncatedPayload { .. }), "{err}");
            assert!(err.to_string().contains("truncated"), "{err}");
        }
        let mut longer = bytes.clone();
        longer.push(b' ');
        let err = decode::<Sample>(p(), &longer).unwrap_err();
        assert!(matches!(err, ReadError::TrailingBytes { extra: 1, .. }));
    }

    #[test]
    fn a_flipped_payload_bit_fails_the_checksum() {
        let mut bytes = encode(&sample()).unwrap();
        let last = bytes.len() - 5;
        bytes[last] ^= 0x01;
        let err = decode::<Sample>(p(), &bytes).unwrap_err();
        assert!(matches!(err, ReadError::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains("corrupted"), "{err}");
    }

    #[test]
    fn wrong_magic_version_and_size_are_named() {
        let good = encode(&sample()).unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode::<Sample>(p(), &bad).unwrap_err(),
            ReadError::BadMagic { .. }
        ));
        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&2u32.to_le_bytes());
        let err = decode::<Sample>(p(), &newer).unwrap_err();
        assert!(
            matches!(err, ReadError::UnsupportedVersion { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("version 2"), "{err}");
        let mut huge = good;
        huge[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            decode::<Sample>(p(), &huge).unwrap_err(),
            ReadError::TooLarge { .. }
        ));
    }

    #[test]
    fn a_valid_frame_around_the_wrong_payload_is_a_decode_error() {
        let bytes = encode(&vec![1u8, 2, 3]).unwrap();
        assert!(matches!(
            decode::<Sample>(p(), &bytes).unwrap_err(),
            ReadError::Decode { .. }
        ));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = read::<Sample>(Path::new("/nonexistent/vm.state")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vm.state"), "{err}");
    }
}
