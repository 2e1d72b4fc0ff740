//! Opaque cursors for keyset pagination.
//!
//! A cursor names the last row of the previous page (never an offset, so concurrent inserts
//! neither skip nor repeat rows). It is hex-encoded so that clients treat it as opaque; it
//! carries no authority, because every page query is still scoped by the caller's team.

use super::error::ApiError;
use crate::store::sandboxes::After;

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 100;

pub fn limit(raw: Option<&str>) -> Result<u32, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!(
                "limit must be an integer from 1 to {MAX_LIMIT}"
            ))),
        },
    }
}

fn bad_cursor() -> ApiError {
    ApiError::bad_request("malformed pagination cursor")
}

fn decode(cursor: &str) -> Result<String, ApiError> {
    let bytes = hex::decode(cursor).map_err(|_| bad_cursor())?;
    String::from_utf8(bytes).map_err(|_| bad_cursor())
}

pub fn encode_sandbox(after: &After) -> String {
    hex::encode(format!("{}.{}", after.created_at, after.id))
}

pub fn decode_sandbox(cursor: &str) -> Result<After, ApiError> {
    let text = decode(cursor)?;
    let (ts, id) = text.split_once('.').ok_or_else(bad_cursor)?;
    Ok(After {
        created_at: ts.parse().map_err(|_| bad_cursor())?,
        id: id.to_owned(),
    })
}

pub fn encode_audit(id: i64) -> String {
    hex::encode(id.to_string())
}

pub fn decode_audit(cursor: &str) -> Result<i64, ApiError> {
    decode(cursor)?.parse().map_err(|_| bad_cursor())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_rejected() {
        let after = After {
            created_at: 1_700_000_000_123,
            id: "cl-abc".into(),
        };
        assert_eq!(decode_sandbox(&encode_sandbox(&after)).unwrap(), after);
        assert_eq!(decode_audit(&encode_audit(42)).unwrap(), 42);
        assert!(decode_sandbox("zz").is_err());
        assert!(decode_sandbox(&hex::encode("no-dot")).is_err());
        assert!(decode_audit(&hex::encode("x1")).is_err());
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some("5")).unwrap(), 5);
        assert!(limit(Some("0")).is_err());
        assert!(limit(Some("101")).is_err());
        assert!(limit(Some("-1")).is_err());
    }
}
