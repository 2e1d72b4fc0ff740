//! A stand-in for "the internet", for tests and benchmarks: a network namespace behind the
//! host (reached through the host's forwarding and the sandboxes' masquerade, like any outside
//! destination) with addresses of its own. Its names do not start with `roost-`, so stale
//! cleanup leaves it alone; [`Internet::remove`] takes it away.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use nlink::netlink::addr::Ipv4Address;
use nlink::netlink::link::VethLink;
use nlink::netlink::namespace;
use nlink::netlink::{Connection, Route};

use crate::netns;

/// Why the stand-in could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot {0}")]
    Netlink(&'static str, #[source] nlink::Error),
    #[error("cannot open the namespace")]
    Open(#[source] std::io::Error),
}

/// A namespace `name` joined to the host by veth `<name>0` (host side `host_ip`/24), holding
/// `addrs` (in the same /24) on its `eth0`.
#[derive(Debug)]
pub struct Internet {
    pub name: String,
    pub host_veth: String,
}

impl Internet {
    /// Creates it (replacing a leftover of the same name).
    pub async fn create(
        name: &str,
        host_ip: Ipv4Addr,
        addrs: &[Ipv4Addr],
    ) -> Result<Self, FixtureError> {
        let nl = |what| move |e| FixtureError::Netlink(what, e);
        let host: Connection<Route> = Connection::<Route>::new().map_err(nl("open netlink"))?;
        let host_veth = format!("{name}0");
        let _ = host.del_link_if_exists(host_veth.as_str()).await;
        let _ = namespace::delete(name);
        namespace::create(name).map_err(nl("create the namespace"))?;
        let this = Self {
            name: name.to_owned(),
            host_veth,
        };
        let ns = std::fs::File::open(netns::path(name)).map_err(FixtureError::Open)?;
        host.add_link(VethLink::new(&this.host_veth, "eth0").peer_netns_fd(ns.as_fd()))
            .await
            .map_err(nl("create the veth pair"))?;
        host.add_address(Ipv4Address::new(&this.host_veth, host_ip, 24))
            .await
            .map_err(nl("address the host veth"))?;
        host.set_link_up(this.host_veth.as_str())
            .await
            .map_err(nl("bring the host veth up"))?;
        let inner: Connection<Route> =
            Connection::new_in(ns.as_fd()).map_err(nl("open netlink inside"))?;
        inner.set_link_up("lo").await.map_err(nl("bring lo up"))?;
        for addr in addrs {
            inner
                .add_address(Ipv4Address::new("eth0", *addr, 24))
                .await
                .map_err(nl("address eth0"))?;
        }
        inner
            .set_link_up("eth0")
            .await
            .map_err(nl("bring eth0 up"))?;
        Ok(this)
    }

    /// Removes the veth and the namespace.
    pub async fn remove(self) -> Result<(), FixtureError> {
        let host: Connection<Route> =
            Connection::<Route>::new().map_err(|e| FixtureError::Netlink("open netlink", e))?;
        host.del_link_if_exists(self.host_veth.as_str())
            .await
            .map_err(|e| FixtureError::Netlink("delete the veth", e))?;
        namespace::delete(&self.name).map_err(|e| FixtureError::Netlink("delete the namespace", e))
    }
}
