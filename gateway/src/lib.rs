//! Roost's edge proxy: `api.<domain>` to control, `<port>-<id>.<domain>` to a port inside a
//! sandbox through the hosting worker's QUIC tunnel, with TLS, rate limits and auto-resume.
//!
//! The gateway issue fills this crate; until then it deliberately exposes nothing.
