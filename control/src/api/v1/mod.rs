//! Native `/v1` routes: accounts, teams, members, API keys, audit log, templates, sandboxes,
//! worker registration and hosts.

pub mod accounts;
pub mod audit;
pub mod keys;
pub mod sandboxes;
pub mod teams;
pub mod templates;
pub mod workers;
