//! The userfaultfd page server: a separate process that fills a restored VM's guest RAM from a
//! memory chain on demand.
//!
//! The VMM maps its RAM anonymous, registers it with a userfaultfd and hands that fd plus the
//! region layout to the server over a Unix socket ([`protocol`]). The server ([`serve`]) answers
//! each fault with the page from the chain (or a zero page), can record which pages a fresh
//! clone touches and replay that working set first on later restores ([`working_set`]). The VMM
//! side ([`client`]) watches the connection: if the server dies, the VM fails with a clear error
//! within a bounded time instead of hanging in a fault forever.

pub mod client;
pub mod protocol;
pub mod serve;
pub mod working_set;

pub use client::{ClientError, PagerLink, PagerLost, RamRegion};
pub use protocol::{Handshake, ProtocolError, Region};
pub use serve::{ServeError, ServeOptions, ServeSummary, serve};
pub use working_set::{WorkingSet, WorkingSetError};
