//! The VMM process's control API: a Unix stream socket speaking line-delimited JSON, one
//! request per line and one reply per line, served by one thread of the VMM process.
//!
//! ```text
//! {"op":"status"}                                   → {"ok":true,"state":"running"}
//! {"op":"pause"} / {"op":"resume"}                  → {"ok":true,"state":"paused"|"running"}
//! {"op":"snapshot","dir":"/abs/dir","kind":"full"|"diff","parent":"/abs/p","resume":false}
//!                                                   → {"ok":true,"state":..,"snapshot":{..}}
//! {"op":"stop"}                                     → {"ok":true} and the VM stops (exit 5)
//! anything else or a failure                        → {"ok":false,"error":"..."}
//! ```
//!
//! The types are the protocol, in `roost_proto::vmm_api` (the worker's client uses them too);
//! [`server`] is the thread.
//! It runs after the VMM dropped its privileges, under its own seccomp allowlist
//! (`seccomp::ThreadKind::Api`): it may accept on its listener, write snapshot files and read
//! the VM's KVM state, nothing else.

mod server;

pub use roost_proto::vmm_api::{
    MAX_LINE, Reply, Request, RunState as RunStateName, SnapshotInfo, SnapshotKind,
};
pub use server::{ApiListener, ApiServer};
