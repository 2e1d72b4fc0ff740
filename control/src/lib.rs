//! Roost's control plane: tenancy, API keys, JWT sessions, the sandbox state machine,
//! placement across workers, the template catalog, timeouts and the audit log.
//!
//! Layers, each depending only on those before it:
//! - [`store`]: the database (SQLite or PostgreSQL through one `AnyPool`), one module per table;
//! - [`auth`]: password hashes, session tokens and API-key secrets (pure functions);
//! - [`lifecycle`]: the sandbox state machine, the operations that drive it and the reaper;
//! - [`placement`]: the seam to workers ([`placement::Placement`]);
//! - [`pki`] and [`workers`]: the worker CA, registration certificates and the QUIC control
//!   channel (sessions, heartbeats, reconciliation, lost hosts);
//! - [`ratelimit`]: per-key and per-team request budgets;
//! - [`route_events`]: sandbox route changes published on Redis for gateways;
//! - [`api`]: the HTTP surface (native `/v1` and E2B-compatible routes, OpenAPI document);
//! - [`server`]: all of the above assembled into one running service (`roost serve control`).

pub mod api;
pub mod auth;
pub mod lifecycle;
pub mod pki;
pub mod placement;
pub mod ratelimit;
pub mod route_events;
pub mod server;
pub mod store;
pub mod workers;
