//! A namespace holding only the guest's tap (up, with the gateway's MAC, no address), for VMs that need a network device but no
//! network: a template is booted in one so that its snapshot carries the virtio-net device
//! (and the guest's configured `eth0`) that every sandbox restored from it attaches to its own
//! slot's tap of the same name. Nothing leaves the namespace: no veth, no route, no rules.
//!
//! Named `roost-i<pid>-<n>`, so [`crate::remove_stale`] removes one a crashed build left.

use std::sync::atomic::{AtomicU32, Ordering};

use std::os::fd::AsFd;

use nlink::netlink::namespace;
use nlink::netlink::{Connection, Route};

use crate::addr::{GATEWAY_MAC, PREFIX, TAP_NAME};
use crate::netns;
use crate::slot::{SlotError, create_tap, remove_namespace};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The namespace; removed when dropped.
#[derive(Debug)]
pub struct IsolatedTap {
    name: String,
}

impl IsolatedTap {
    /// Creates the namespace and its persistent, up tap [`TAP_NAME`] with the gateway's MAC
    /// (which the guest may remember).
    pub async fn create() -> Result<Self, SlotError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}i{}-{n}", std::process::id());
        let _ = remove_namespace(&name);
        namespace::create(&name).map_err(|source| SlotError::Netlink {
            what: "create the namespace",
            netns: name.clone(),
            source,
        })?;
        let this = Self { name };
        create_tap(&this.name)?;
        let nl = |what: &'static str| {
            let netns = this.name.clone();
            move |source| SlotError::Netlink {
                what,
                netns,
                source,
            }
        };
        let ns_file =
            std::fs::File::open(netns::path(&this.name)).map_err(|source| SlotError::Io {
                what: "open the namespace",
                netns: this.name.clone(),
                source,
            })?;
        let ns: Connection<Route> =
            Connection::new_in(ns_file.as_fd()).map_err(nl("open netlink"))?;
        ns.set_link_address(TAP_NAME, GATEWAY_MAC)
            .await
            .map_err(nl("set the tap's MAC"))?;
        ns.set_link_up(TAP_NAME)
            .await
            .map_err(nl("bring the tap up"))?;
        Ok(this)
    }

    /// The namespace's name (under `/var/run/netns`).
    pub fn netns(&self) -> &str {
        &self.name
    }

    /// The tap inside, for `roost vm run --net-tap`.
    pub fn tap_name(&self) -> &'static str {
        TAP_NAME
    }
}

impl Drop for IsolatedTap {
    fn drop(&mut self) {
        if let Err(e) = remove_namespace(&self.name) {
            tracing::warn!(netns = %self.name, error = %e, "cannot remove an isolated tap namespace");
        }
    }
}
