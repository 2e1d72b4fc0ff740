//! Stale state from a worker that died: every `roost-` namespace, every `roost-` host
//! interface and the host's `roost` nftables table. Run at worker start, before the pool is
//! filled; it assumes no other worker shares the host.

use nlink::netlink::namespace;
use nlink::netlink::{Connection, Nftables, Route};

use crate::addr::PREFIX;
use crate::rules::{FAMILY, TABLE};
use crate::slot::{SlotError, remove_namespace};

/// What [`remove_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    pub host_table: bool,
}

/// Why cleanup failed (it goes on past individual failures and reports the first).
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("cannot {0}")]
    Netlink(&'static str, #[source] nlink::Error),
    #[error(transparent)]
    Slot(#[from] SlotError),
}

/// Names of the `roost-` namespaces on this host.
pub fn list_namespaces() -> Result<Vec<String>, CleanupError> {
    let names =
        namespace::list().map_err(|e| CleanupError::Netlink("list network namespaces", e))?;
    Ok(names
        .into_iter()
        .filter(|n| n.starts_with(PREFIX))
        .collect())
}

/// Names of the `roost-` interfaces in the host namespace.
pub async fn list_links(host: &Connection<Route>) -> Result<Vec<String>, CleanupError> {
    let links = host
        .get_links()
        .await
        .map_err(|e| CleanupError::Netlink("list host interfaces", e))?;
    Ok(links
        .iter()
        .filter_map(|l| l.name())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Whether the host `roost` table exists.
pub async fn host_table_exists(nft: &Connection<Nftables>) -> Result<bool, CleanupError> {
    let tables = nft
        .list_tables()
        .await
        .map_err(|e| CleanupError::Netlink("list nftables tables", e))?;
    Ok(tables.iter().any(|t| t.name == TABLE && t.family == FAMILY))
}

/// What this crate has on the host right now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    pub host_table: bool,
}

/// Lists the `roost-` namespaces, host interfaces and whether the host table exists.
pub async fn inventory() -> Result<Inventory, CleanupError> {
    let host = Connection::<Route>::new().map_err(|e| CleanupError::Netlink("open netlink", e))?;
    let nft = Connection::<Nftables>::new()
        .map_err(|e| CleanupError::Netlink("open nftables netlink", e))?;
    Ok(Inventory {
        namespaces: list_namespaces()?,
        links: list_links(&host).await?,
        host_table: host_table_exists(&nft).await?,
    })
}

/// Removes every stale namespace, host interface and the host table.
pub async fn remove_stale() -> Result<CleanupReport, CleanupError> {
    let host: Connection<Route> =
        Connection::<Route>::new().map_err(|e| CleanupError::Netlink("open netlink", e))?;
    let nft: Connection<Nftables> = Connection::<Nftables>::new()
        .map_err(|e| CleanupError::Netlink("open nftables netlink", e))?;
    let mut report = CleanupReport::default();
    let mut first_error = None;
    for link in list_links(&host).await? {
        match host.del_link_if_exists(link.as_str()).await {
            Ok(_) => report.links.push(link),
            Err(e) => {
                tracing::warn!(%link, error = %e, "cannot remove a stale interface");
                first_error.get_or_insert(CleanupError::Netlink("remove a stale interface", e));
            }
        }
    }
    for name in list_namespaces()? {
        match remove_namespace(&name) {
            Ok(()) => report.namespaces.push(name),
            Err(e) => {
                tracing::warn!(%name, error = %e, "cannot remove a stale namespace");
                first_error.get_or_insert(e.into());
            }
        }
    }
    match nft.del_table_if_exists(TABLE, FAMILY).await {
        Ok(existed) => report.host_table = existed,
        Err(e) => {
            first_error.get_or_insert(CleanupError::Netlink("remove the host nftables table", e));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}
