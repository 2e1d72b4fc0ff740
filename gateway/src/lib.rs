//! Roost's edge proxy: `api.<domain>` to control, `<port>-<id>.<domain>` to a port inside a
//! sandbox through the hosting worker's QUIC tunnel, with TLS, rate limits and auto-resume.
//!
//! Layout: [`target`] parses where a request goes; [`routes`] finds and caches which worker
//! hosts a sandbox (fed by control's events); [`access`] checks tokens; [`ratelimit`] limits
//! clients; [`upstream`] opens the stream to a sandbox port; [`proxy`] is the Pingora request
//! pipeline using all of them; [`server`] assembles the services. See `docs/gateway.md`.

pub mod access;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod reply;
mod report;
pub mod routes;
pub mod server;
pub mod target;
pub mod tunnel;
pub mod upstream;
