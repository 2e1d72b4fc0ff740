//! Native `/v1` routes: accounts, teams, members, API keys, audit log, templates, sandboxes.

pub mod accounts;
pub mod audit;
pub mod keys;
pub mod sandboxes;
pub mod teams;
pub mod templates;
