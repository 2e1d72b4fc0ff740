//! One pool slot: a network namespace holding the guest's tap (`tap0`, the guest's gateway),
//! the namespace end of a veth pair (`eth0`), a default route to the host end, the namespace's
//! nftables table (NAT and, once assigned, the sandbox's policy) and the DNS socket.
//!
//! Creation undoes itself on any error; [`Slot::destroy`] removes the host veth (which takes
//! its peer with it) and the namespace (which takes the tap and the rules with it).

use std::net::SocketAddr;
use std::os::fd::AsFd;

use ipnet::Ipv4Net;
use nlink::netlink::addr::Ipv4Address;
use nlink::netlink::link::VethLink;
use nlink::netlink::namespace;
use nlink::netlink::route::Ipv4Route;
use nlink::netlink::{Connection, Nftables, Route};
use nlink::tuntap::{Mode, TunTap};

use crate::addr::{
    GATEWAY_MAC, GUEST_GATEWAY, GUEST_PREFIX_LEN, NS_VETH_NAME, SlotAddrs, TAP_NAME,
};
use crate::netns;
use crate::rules;

/// Why a slot could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("network namespace {0} already exists")]
    Taken(String),
    #[error("cannot {what} for network namespace {netns}")]
    Netlink {
        what: &'static str,
        netns: String,
        #[source]
        source: nlink::Error,
    },
    #[error("cannot {what} inside network namespace {netns}")]
    Io {
        what: &'static str,
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Rules(#[from] rules::RulesError),
}

/// A set-up slot (namespace, veth, tap, NAT, DNS socket).
#[derive(Debug)]
pub struct Slot {
    pub addrs: SlotAddrs,
    /// UDP socket bound to the guest's gateway port 53 inside the namespace.
    pub dns_socket: Option<std::net::UdpSocket>,
}

impl Slot {
    /// Sets up `addrs`'s namespace and host veth. `Taken` when the namespace exists already
    /// (another worker process, or a stale one): the caller picks another slot.
    pub async fn create(
        host: &Connection<Route>,
        addrs: SlotAddrs,
        blocked: &[Ipv4Net],
    ) -> Result<Self, SlotError> {
        if namespace::exists(&addrs.netns) {
            return Err(SlotError::Taken(addrs.netns));
        }
        namespace::create(&addrs.netns).map_err(|source| {
            if source.is_already_exists() {
                SlotError::Taken(addrs.netns.clone())
            } else {
                SlotError::Netlink {
                    what: "create the namespace",
                    netns: addrs.netns.clone(),
                    source,
                }
            }
        })?;
        let mut slot = Self {
            addrs,
            dns_socket: None,
        };
        match slot.plumb(host, blocked).await {
            Ok(()) => Ok(slot),
            Err(err) => {
                if let Err(cleanup) = slot.destroy(host).await {
                    tracing::error!(error = %cleanup, "cannot undo a half-made network slot");
                }
                Err(err)
            }
        }
    }

    async fn plumb(
        &mut self,
        host: &Connection<Route>,
        blocked: &[Ipv4Net],
    ) -> Result<(), SlotError> {
        let a = self.addrs.clone();
        let nl = |what: &'static str| {
            let netns = a.netns.clone();
            move |source| SlotError::Netlink {
                what,
                netns,
                source,
            }
        };
        let ns_file =
            std::fs::File::open(netns::path(&a.netns)).map_err(|source| SlotError::Io {
                what: "open the namespace",
                netns: a.netns.clone(),
                source,
            })?;
        host.add_link(VethLink::new(&a.host_veth, NS_VETH_NAME).peer_netns_fd(ns_file.as_fd()))
            .await
            .map_err(nl("create the veth pair"))?;
        host.add_address(Ipv4Address::new(&a.host_veth, a.host_ip, 30))
            .await
            .map_err(nl("address the host veth"))?;
        host.set_link_up(a.host_veth.as_str())
            .await
            .map_err(nl("bring the host veth up"))?;

        create_tap(&a.netns)?;

        let ns: Connection<Route> =
            Connection::new_in(ns_file.as_fd()).map_err(nl("open netlink"))?;
        ns.set_link_up("lo").await.map_err(nl("bring lo up"))?;
        ns.add_address(Ipv4Address::new(NS_VETH_NAME, a.ns_ip, 30))
            .await
            .map_err(nl("address eth0"))?;
        ns.set_link_up(NS_VETH_NAME)
            .await
            .map_err(nl("bring eth0 up"))?;
        ns.add_route(
            Ipv4Route::default_route()
                .gateway(a.host_ip)
                .dev(NS_VETH_NAME),
        )
        .await
        .map_err(nl("add the default route"))?;
        ns.set_link_address(TAP_NAME, GATEWAY_MAC)
            .await
            .map_err(nl("set the tap's MAC"))?;
        ns.add_address(Ipv4Address::new(TAP_NAME, GUEST_GATEWAY, GUEST_PREFIX_LEN))
            .await
            .map_err(nl("address the tap"))?;
        ns.set_link_up(TAP_NAME)
            .await
            .map_err(nl("bring the tap up"))?;
        namespace::set_sysctl(&a.netns, "net.ipv4.ip_forward", "1")
            .map_err(nl("enable forwarding"))?;

        let nft: Connection<Nftables> =
            Connection::new_in(ns_file.as_fd()).map_err(nl("open nftables netlink"))?;
        rules::namespace_table(nft.transaction(), &a, blocked)?
            .commit(&nft)
            .await
            .map_err(nl("install the namespace's nftables table"))?;

        let dns_addr = SocketAddr::from((GUEST_GATEWAY, 53));
        let socket = netns::run_in(&a.netns, move || std::net::UdpSocket::bind(dns_addr))?
            .map_err(|source| SlotError::Io {
                what: "bind the DNS socket",
                netns: a.netns.clone(),
                source,
            })?;
        self.dns_socket = Some(socket);
        Ok(())
    }

    /// Removes the host veth (its peer goes with it) and the namespace (the tap, the rules and
    /// the conntrack state go with it once no process is left inside).
    pub async fn destroy(mut self, host: &Connection<Route>) -> Result<(), SlotError> {
        // The DNS socket holds a reference on the namespace: close it first.
        self.dns_socket = None;
        let veth = host
            .del_link_if_exists(self.addrs.host_veth.as_str())
            .await
            .map(drop)
            .map_err(|source| SlotError::Netlink {
                what: "delete the host veth",
                netns: self.addrs.netns.clone(),
                source,
            });
        let ns = remove_namespace(&self.addrs.netns);
        veth.and(ns)
    }

    /// The namespace's nftables connection (for policy and DNS admissions).
    pub fn nftables(&self) -> Result<Connection<Nftables>, SlotError> {
        let file = std::fs::File::open(netns::path(&self.addrs.netns)).map_err(|source| {
            SlotError::Io {
                what: "open the namespace",
                netns: self.addrs.netns.clone(),
                source,
            }
        })?;
        Connection::new_in(file.as_fd()).map_err(|source| SlotError::Netlink {
            what: "open nftables netlink",
            netns: self.addrs.netns.clone(),
            source,
        })
    }
}

/// Creates [`TAP_NAME`] in namespace `netns`, persistent: it stays when the creating fd
/// closes, for the VMM to attach to.
pub(crate) fn create_tap(netns: &str) -> Result<(), SlotError> {
    netns::run_in(netns, || {
        TunTap::builder()
            .name(TAP_NAME)
            .mode(Mode::Tap)
            .no_pi(true)
            .persistent(true)
            .create()
            .map(drop)
    })?
    .map_err(|e| SlotError::Io {
        what: "create the tap",
        netns: netns.to_owned(),
        source: std::io::Error::other(e),
    })
}

/// Deletes a named namespace; one that is already gone is fine.
pub fn remove_namespace(name: &str) -> Result<(), SlotError> {
    match namespace::delete(name) {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(source) => Err(SlotError::Netlink {
            what: "delete the namespace",
            netns: name.to_owned(),
            source,
        }),
    }
}
