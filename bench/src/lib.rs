//! Roost's benchmarks and load generator.
//!
//! Every scenario measures Roost against a baseline in the same run (these machines are shared
//! and noisy, so only medians and ratios mean anything) and ends by printing one JSON object.

pub mod agent;
pub mod control;
pub mod gateway;
pub mod guest_boot;
pub mod hostvm;
pub mod net;
pub mod restore;
pub mod stats;
pub mod vmm_boot;
