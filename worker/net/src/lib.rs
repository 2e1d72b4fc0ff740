//! roost-net: egress networking for sandboxes.
//!
//! Each sandbox that may use the network gets a network namespace (`roost-n<k>`) holding the
//! tap its VM's virtio-net device uses, the namespace end of a veth pair to the host
//! (`roost-v<k>` on the host, a unique /30 per slot) and an nftables table with NAT and the
//! sandbox's egress policy. Every guest has the same address and MAC ([`addr`]), so a
//! snapshot clone needs no reconfiguration. A worker-side DNS forwarder per sandbox applies the
//! host-name rules. Namespaces are pooled ([`NetManager`]), removed when released or at the
//! next start after a crash ([`cleanup::remove_stale`]).
//!
//! Everything is done over netlink (the `nlink` crate: links, addresses, routes, tun/tap,
//! nftables), so the host needs neither `ip` nor `nft` binaries. See `docs/networking.md`.

pub mod addr;
pub mod cleanup;
pub mod dns;
pub mod fixture;
pub mod isolated;
pub mod manager;
pub mod netns;
pub mod policy;
pub mod rules;
pub mod slot;

pub use addr::{GUEST_GATEWAY, GUEST_IP, GUEST_MAC, GUEST_PREFIX_LEN, SlotAddrs, TAP_NAME};
pub use cleanup::{CleanupReport, Inventory, inventory, remove_stale};
pub use ipnet::Ipv4Net;
pub use isolated::IsolatedTap;
pub use manager::{NetConfig, NetError, NetManager, SandboxNet};
pub use policy::{Destination, EgressPolicy, PolicyError};
