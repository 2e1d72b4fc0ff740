//! `roost serve worker --net`: sandbox egress networking for the worker. Every VMM starts in
//! a network slot of its own (`roost_net`: namespace, tap, veth, NAT) that enforces the
//! sandbox's `allow_internet_access` / `allowOut` / `denyOut`, and warm clones wait in slots
//! that refuse everything until their sandbox's policy is applied. Stale `roost-` namespaces,
//! interfaces and the host table a crashed worker left are removed before anything starts.
//!
//! Besides the built-in refusals (other sandboxes, link-local and metadata addresses,
//! loopback, the worker host itself), every address control answers on — its REST API and its
//! QUIC channel — is reserved, so no sandbox can reach the control plane's host.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use roost_net::{Ipv4Net, NetConfig, NetManager, addr};

/// Options of the worker's networking.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerNetArgs {
    /// Give sandboxes egress networking with their policy (needs root and nf_tables). Offers
    /// the templates built with a network device (`roost templates build --network`).
    #[arg(long = "net")]
    pub net: bool,
    /// Upstream resolver of the sandboxes' DNS forwarders [default: first nameserver of
    /// /etc/resolv.conf].
    #[arg(long = "net-upstream-dns", value_name = "ADDR:PORT", requires = "net")]
    pub net_upstream_dns: Option<SocketAddr>,
    /// More destinations no sandbox may reach, as IPv4 CIDRs (repeatable); control's own
    /// addresses are always added.
    #[arg(long = "net-reserved", value_name = "CIDR", requires = "net")]
    pub net_reserved: Vec<Ipv4Net>,
    /// Network slots kept ready (namespace, veth, tap, NAT made ahead of creates).
    #[arg(long = "net-pool", default_value_t = 2, value_name = "N")]
    pub net_pool: usize,
    /// Range the per-sandbox host /30s come from (must be unused on this host).
    #[arg(long = "net-pool-range", default_value_t = addr::DEFAULT_POOL_RANGE)]
    pub net_pool_range: Ipv4Net,
}

/// Removes what a crashed worker left, then sets up the host's sandbox networking and fills
/// its slot pool. `control` are control's `HOST:PORT`s (REST, channel), reserved.
pub async fn start(args: &WorkerNetArgs, control: &[String]) -> anyhow::Result<NetManager> {
    let stale = roost_net::remove_stale()
        .await
        .context("cannot remove a previous run's sandbox networks")?;
    for name in stale.namespaces.iter().chain(&stale.links) {
        tracing::info!(%name, "removed a previous run's sandbox network");
    }
    let upstream_dns = match args.net_upstream_dns {
        Some(addr) => addr,
        None => crate::cmd_net::system_resolver()?,
    };
    let mut reserved = args.net_reserved.clone();
    for address in control {
        reserved.extend(control_nets(address).await?);
    }
    reserved.sort();
    reserved.dedup();
    tracing::info!(?reserved, %upstream_dns, "sandbox networking: reserved destinations");
    let net = NetManager::start(NetConfig {
        pool_range: args.net_pool_range,
        reserved,
        pool_size: args.net_pool,
        upstream_dns,
    })
    .await
    .context("cannot set up sandbox networking (needs root and nf_tables)")?;
    net.fill_pool()
        .await
        .context("cannot make the ready network slots")?;
    Ok(net)
}

/// The IPv4 addresses `address` (`HOST:PORT`) resolves to, as /32s.
async fn control_nets(address: &str) -> anyhow::Result<Vec<Ipv4Net>> {
    let resolved = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("cannot resolve control's address {address} to reserve it"))?;
    Ok(resolved
        .filter_map(|addr| match addr.ip() {
            IpAddr::V4(ip) => Some(Ipv4Net::from(ip)),
            IpAddr::V6(_) => None,
        })
        .collect())
}

/// `HOST:PORT` of an `http(s)://HOST[:PORT]/…` URL (the port defaulted from the scheme).
pub fn url_host_port(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.is_empty() {
        return None;
    }
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    if has_port {
        return Some(authority.to_owned());
    }
    let port = match scheme {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    Some(format!("{authority}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls_give_their_host_and_port() {
        assert_eq!(
            url_host_port("http://10.0.2.2:3000").as_deref(),
            Some("10.0.2.2:3000")
        );
        assert_eq!(
            url_host_port("https://control.example/api?x").as_deref(),
            Some("control.example:443")
        );
        assert_eq!(
            url_host_port("http://u:p@[::1]/").as_deref(),
            Some("[::1]:80")
        );
        assert_eq!(url_host_port("control:3000"), None);
        assert_eq!(url_host_port("ftp://x"), None);
    }

    #[tokio::test]
    async fn control_addresses_become_host_routes() {
        assert_eq!(
            control_nets("127.0.0.1:3000").await.unwrap(),
            vec!["127.0.0.1/32".parse::<Ipv4Net>().unwrap()]
        );
        assert!(control_nets("[::1]:3000").await.unwrap().is_empty());
    }
}
