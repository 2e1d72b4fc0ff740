//! The host's sandbox networking: sets up the host table and forwarding once, keeps a pool of
//! ready slots, hands one to each sandbox with its policy and DNS forwarder, and takes it
//! back.
//!
//! A pooled slot is fully plumbed (namespace, veth, tap, NAT, empty policy that refuses
//! everything); handing it out only fills the policy sets and chain (one nftables batch) and
//! starts the DNS forwarder. A released slot is destroyed, never reused: its conntrack state,
//! DNS admissions and ARP entries belong to the last sandbox.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::Ipv4Net;
use nlink::netlink::{Connection, Nftables, Route};
use tokio::sync::Mutex;

use crate::addr::{self, GUEST_IP, GUEST_MAC, SlotAddrs, TAP_NAME};
use crate::cleanup::{self, CleanupError};
use crate::dns::DnsForwarder;
use crate::netns::{self, NetnsError};
use crate::policy::{EgressPolicy, always_blocked};
use crate::rules::{self, RulesError};
use crate::slot::{Slot, SlotError, remove_namespace};

/// How the host's sandbox networking is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Range the per-slot /30s come from (must not be used elsewhere on the host).
    pub pool_range: Ipv4Net,
    /// Extra destinations no sandbox may reach: the control plane, the worker's own addresses,
    /// internal networks.
    pub reserved: Vec<Ipv4Net>,
    /// Ready slots to keep.
    pub pool_size: usize,
    /// Where the DNS forwarders send queries.
    pub upstream_dns: SocketAddr,
}

impl NetConfig {
    /// Defaults: [`addr::DEFAULT_POOL_RANGE`], no reserved list, 4 ready slots, `upstream`.
    pub fn new(upstream_dns: SocketAddr) -> Self {
        Self {
            pool_range: addr::DEFAULT_POOL_RANGE,
            reserved: Vec::new(),
            pool_size: 4,
            upstream_dns,
        }
    }
}

/// Errors of the networking manager.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot {0}")]
    Netlink(&'static str, #[source] nlink::Error),
    #[error("cannot enable IPv4 forwarding on the host")]
    Forwarding(#[source] std::io::Error),
    #[error("no free network slot in {0}")]
    Exhausted(Ipv4Net),
    #[error("cannot start the DNS forwarder")]
    Dns(#[source] std::io::Error),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("the network of {0} already has its policy")]
    AlreadyActive(String),
}

struct Inner {
    config: NetConfig,
    blocked: Vec<Ipv4Net>,
    host: Connection<Route>,
    pool: Mutex<VecDeque<Slot>>,
    /// Next slot number to try.
    cursor: Mutex<u32>,
    /// A background refill of the pool is under way.
    refilling: AtomicBool,
    /// [`NetManager::shutdown`] ran: slots made after it are removed, not pooled.
    closed: AtomicBool,
}

/// The host's sandbox networking.
#[derive(Clone)]
pub struct NetManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NetManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetManager")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl NetManager {
    /// Enables forwarding and installs the host table (if this host has none yet). Does not
    /// fill the pool ([`NetManager::fill_pool`]) nor remove stale state
    /// ([`cleanup::remove_stale`], which a worker runs first).
    pub async fn start(config: NetConfig) -> Result<Self, NetError> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetError::Forwarding)?;
        let mut blocked = always_blocked(config.pool_range);
        blocked.extend(config.reserved.iter().map(Ipv4Net::trunc));
        let host: Connection<Route> =
            Connection::<Route>::new().map_err(|e| NetError::Netlink("open netlink", e))?;
        let nft: Connection<Nftables> = Connection::<Nftables>::new()
            .map_err(|e| NetError::Netlink("open nftables netlink", e))?;
        if !cleanup::host_table_exists(&nft).await? {
            rules::host_table(nft.transaction(), config.pool_range, &blocked)?
                .commit(&nft)
                .await
                .map_err(|e| NetError::Netlink("install the host nftables table", e))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                blocked,
                host,
                pool: Mutex::new(VecDeque::new()),
                cursor: Mutex::new(0),
                refilling: AtomicBool::new(false),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.inner.config
    }

    /// Sets up a new slot in the first free slot number.
    async fn new_slot(&self) -> Result<Slot, NetError> {
        let capacity = addr::capacity(self.inner.config.pool_range);
        let mut cursor = self.inner.cursor.lock().await;
        for _ in 0..capacity {
            let number = *cursor;
            *cursor = (number + 1) % capacity;
            let addrs = SlotAddrs::new(self.inner.config.pool_range, number)
                .map_err(|_| NetError::Exhausted(self.inner.config.pool_range))?;
            match Slot::create(&self.inner.host, addrs, &self.inner.blocked).await {
                Ok(slot) => return Ok(slot),
                Err(SlotError::Taken(name)) => {
                    tracing::debug!(%name, "network slot in use; trying the next");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(NetError::Exhausted(self.inner.config.pool_range))
    }

    /// Tops the pool up to its configured size.
    pub async fn fill_pool(&self) -> Result<(), NetError> {
        while self.inner.pool.lock().await.len() < self.inner.config.pool_size {
            let slot = self.new_slot().await?;
            let mut pool = self.inner.pool.lock().await;
            if self.inner.closed.load(Ordering::Acquire) {
                drop(pool);
                return Ok(slot.destroy(&self.inner.host).await?);
            }
            pool.push_back(slot);
        }
        Ok(())
    }

    /// Ready slots in the pool.
    pub async fn pooled(&self) -> usize {
        self.inner.pool.lock().await.len()
    }

    /// Networking for one sandbox: a pooled slot if there is one, else a new one.
    pub async fn acquire(&self, policy: EgressPolicy) -> Result<SandboxNet, NetError> {
        let net = self.reserve().await?;
        self.activated(net, policy).await
    }

    /// Networking for one sandbox from a slot made now (the pool is not touched).
    pub async fn acquire_fresh(&self, policy: EgressPolicy) -> Result<SandboxNet, NetError> {
        let net = SandboxNet::reserved(self.new_slot().await?);
        self.activated(net, policy).await
    }

    /// `net` with `policy` in force; removed when that fails.
    async fn activated(
        &self,
        mut net: SandboxNet,
        policy: EgressPolicy,
    ) -> Result<SandboxNet, NetError> {
        match self.activate(&mut net, policy).await {
            Ok(()) => Ok(net),
            Err(e) => {
                if let Err(cleanup) = self.release(net).await {
                    tracing::error!(error = %cleanup, "cannot remove a network slot after a failed hand-out");
                }
                Err(e)
            }
        }
    }

    /// Networking whose policy is not known yet (a pre-warmed VM's): a pooled or new slot
    /// that refuses every packet and answers no DNS until [`NetManager::activate`].
    pub async fn reserve(&self) -> Result<SandboxNet, NetError> {
        let pooled = self.inner.pool.lock().await.pop_front();
        let slot = match pooled {
            Some(slot) => {
                self.refill_in_background();
                slot
            }
            None => self.new_slot().await?,
        };
        Ok(SandboxNet::reserved(slot))
    }

    /// Tops the pool up on a task of its own (one at a time), off the hand-out's clock.
    fn refill_in_background(&self) {
        if self.inner.config.pool_size == 0
            || tokio::runtime::Handle::try_current().is_err()
            || self.inner.refilling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.fill_pool().await {
                tracing::warn!(error = %e, "cannot refill the network slot pool");
            }
            this.inner.refilling.store(false, Ordering::Release);
        });
    }

    /// Gives reserved networking its sandbox's policy (one nftables batch) and starts its DNS
    /// forwarder. Refused when `net` was activated before.
    pub async fn activate(
        &self,
        net: &mut SandboxNet,
        policy: EgressPolicy,
    ) -> Result<(), NetError> {
        if net.dns.is_some() {
            return Err(NetError::AlreadyActive(net.addrs.netns.clone()));
        }
        let slot = net
            .slot
            .as_mut()
            .ok_or_else(|| NetError::AlreadyActive(net.addrs.netns.clone()))?;
        let nft = slot.nftables()?;
        rules::apply_policy(nft.transaction(), &policy)?
            .commit(&nft)
            .await
            .map_err(|e| NetError::Netlink("install the sandbox's egress policy", e))?;
        let socket = slot
            .dns_socket
            .take()
            .ok_or(NetError::Dns(std::io::Error::other(
                "the slot has no DNS socket",
            )))?;
        let dns = DnsForwarder::spawn(
            socket,
            Arc::new(policy),
            self.inner.config.upstream_dns,
            nft,
        )
        .map_err(NetError::Dns)?;
        net.dns = Some(dns);
        Ok(())
    }

    /// Takes a sandbox's networking back and removes it.
    pub async fn release(&self, mut net: SandboxNet) -> Result<(), NetError> {
        net.dns = None;
        match net.slot.take() {
            Some(slot) => Ok(slot.destroy(&self.inner.host).await?),
            None => Ok(()),
        }
    }

    /// Removes the pooled slots, and the host table when no `roost-` namespace is left.
    pub async fn shutdown(&self) -> Result<(), NetError> {
        let slots: Vec<Slot> = {
            let mut pool = self.inner.pool.lock().await;
            self.inner.closed.store(true, Ordering::Release);
            pool.drain(..).collect()
        };
        let mut first_error = None;
        for slot in slots {
            if let Err(e) = slot.destroy(&self.inner.host).await {
                first_error.get_or_insert(NetError::from(e));
            }
        }
        if cleanup::list_namespaces()?.is_empty() {
            let nft: Connection<Nftables> = Connection::<Nftables>::new()
                .map_err(|e| NetError::Netlink("open nftables netlink", e))?;
            nft.del_table_if_exists(rules::TABLE, rules::FAMILY)
                .await
                .map_err(|e| NetError::Netlink("remove the host nftables table", e))?;
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// One sandbox's networking. Give it back with [`NetManager::release`], or drop it: dropping
/// removes its namespace too, and the host veth goes when the kernel frees the namespace (once
/// the VMM inside has exited), which is how a VM handle that owns it frees it.
#[derive(Debug)]
pub struct SandboxNet {
    addrs: SlotAddrs,
    slot: Option<Slot>,
    dns: Option<DnsForwarder>,
}

impl SandboxNet {
    fn reserved(slot: Slot) -> Self {
        Self {
            addrs: slot.addrs.clone(),
            slot: Some(slot),
            dns: None,
        }
    }

    /// Whether it has its sandbox's policy ([`NetManager::activate`]).
    pub fn is_active(&self) -> bool {
        self.dns.is_some()
    }

    /// The namespace the VMM must run in (name under `/var/run/netns`).
    pub fn netns(&self) -> &str {
        &self.addrs.netns
    }

    /// The host-side names and addresses.
    pub fn addrs(&self) -> &SlotAddrs {
        &self.addrs
    }

    /// The tap inside the namespace, for `roost vm run --net-tap`.
    pub fn tap_name(&self) -> &'static str {
        TAP_NAME
    }

    /// The guest's MAC, for `roost vm run --net-mac`.
    pub fn guest_mac(&self) -> [u8; 6] {
        GUEST_MAC
    }

    /// The guest's address (the same in every sandbox).
    pub fn guest_ip(&self) -> std::net::Ipv4Addr {
        GUEST_IP
    }

    /// Makes `command` start inside this sandbox's namespace.
    pub fn command_in(&self, command: &mut Command) -> Result<(), NetError> {
        Ok(netns::command_in(&self.addrs.netns, command)?)
    }
}

impl Drop for SandboxNet {
    fn drop(&mut self) {
        self.dns = None;
        if let Some(mut slot) = self.slot.take() {
            slot.dns_socket = None;
            tracing::debug!(netns = %self.addrs.netns, "sandbox network dropped; removing its namespace");
            if let Err(e) = remove_namespace(&self.addrs.netns) {
                tracing::error!(error = %e, "cannot remove a dropped sandbox's namespace");
            }
        }
    }
}
