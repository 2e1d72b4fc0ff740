//! Roost's control plane: tenancy, API keys, JWT sessions, the sandbox state machine,
//! placement across workers, the template catalog, timeouts and the audit log.
//!
//! The control-plane issue fills this crate; until then it deliberately exposes nothing, so
//! that no other part can come to depend on behaviour that does not exist yet.
