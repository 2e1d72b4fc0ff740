//! Roost's host agent: the sandbox manager, snapshot pools, userfaultfd page server, copy-on-write
//! disks, per-sandbox networking, the tunnel endpoint and the control channel.
//!
//! Today it holds the host checks that decide whether this machine can run microVMs at all
//! (used by `roost doctor`, and by the worker before it starts a VM). The VMM itself lives in
//! the `roost-vmm` crate beside this one.

pub mod cgroup;
pub mod disk;
pub mod host_check;
pub mod jail;
pub mod manager;
pub mod pool;
pub mod template;
pub mod tunnel;
pub mod vm_handle;
