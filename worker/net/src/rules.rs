//! The nftables rules, as data: one `ip roost` table on the host shared by every sandbox, and
//! one `ip roost` table inside each sandbox's namespace holding that sandbox's egress policy.
//!
//! Putting the per-sandbox policy inside the sandbox's own namespace means deleting the
//! namespace deletes its rules: no per-sandbox host rule can outlive its sandbox. The guest
//! cannot touch them (it is behind the VM's tap). The host table only does what needs the
//! host's view: masquerade the pool range out of the host, refuse sandbox↔sandbox and
//! sandbox→host traffic, and a second line of the always-blocked destinations.
//!
//! Only IPv4 is forwarded: the tables are family `ip`, IPv6 forwarding stays off in the
//! namespaces, and the guest has no IPv6 route.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use nlink::netlink::nftables::{
    BaseChain, Chain, CtState, Family, FilterHook, NatHook, Policy, Priority, Rule, Set,
    SetElement, SetKeyType, Transaction,
};

use crate::addr::{GUEST_GATEWAY, GUEST_IP, NS_VETH_NAME, PREFIX, SlotAddrs, TAP_NAME};
use crate::policy::EgressPolicy;

/// The table name, on the host and in every namespace.
pub const TABLE: &str = "roost";
/// The table family (IPv4 only).
pub const FAMILY: Family = Family::Ip;
/// Set of destinations no sandbox may reach (namespace and host tables).
pub const SET_BLOCKED: &str = "blocked";
/// Set of `allowOut` CIDRs.
pub const SET_ALLOW: &str = "allow";
/// Set of `denyOut` CIDRs.
pub const SET_DENY: &str = "deny";
/// Set of addresses the DNS forwarder admitted for allowed host names (elements time out).
pub const SET_DNS_ALLOW: &str = "dns_allow";
/// The per-sandbox policy chain, filled when a pooled namespace is handed to a sandbox.
pub const CHAIN_EGRESS: &str = "egress";
/// ICMP code "port unreachable": what a refused connection gets (fails at once).
const ICMP_PORT_UNREACHABLE: u8 = 3;
/// Wildcard for every host veth (`roost-v*`).
const HOST_VETH_GLOB: &str = "roost-v";
/// IPPROTO_TCP.
const TCP: u8 = 6;

/// Errors building rules (an nlink builder refused a name or element).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the nftables rules")]
pub struct RulesError(#[source] pub nlink::Error);

fn chain(name: &str, base: BaseChain) -> Result<Chain, RulesError> {
    Ok(Chain::new(TABLE, name)
        .map_err(RulesError)?
        .family(FAMILY)
        .base(base))
}

fn rule(chain: &str) -> Rule {
    Rule::new(TABLE, chain).family(FAMILY)
}

/// Refuse: TCP gets a reset, anything else ICMP port unreachable.
fn refuse(chain: &str, matches: impl Fn(Rule) -> Rule) -> [Rule; 2] {
    [
        matches(rule(chain)).match_l4proto(TCP).reject_tcp_reset(),
        matches(rule(chain)).reject_icmp(ICMP_PORT_UNREACHABLE),
    ]
}

fn interval_set(name: &str) -> Set {
    Set::new(TABLE, name)
        .family(FAMILY)
        .key_type(SetKeyType::Ipv4Addr)
        .interval()
}

fn net_elements(nets: &[Ipv4Net]) -> Result<Vec<SetElement>, RulesError> {
    // Overlapping intervals are refused by the kernel: merge them first.
    Ipv4Net::aggregate(&nets.to_vec())
        .iter()
        .map(|n| SetElement::ipv4_prefix(n.network(), n.prefix_len()).map_err(RulesError))
        .collect()
}

/// The host table: masquerade the pool range out, keep sandboxes off each other and off the
/// host, and refuse the blocked destinations a second time. `blocked` includes the worker's
/// reserved list (control plane, its own addresses).
pub fn host_table(
    tx: Transaction,
    pool_range: Ipv4Net,
    blocked: &[Ipv4Net],
) -> Result<Transaction, RulesError> {
    let blocked_set = interval_set(SET_BLOCKED);
    let mut tx = tx
        .add_table(TABLE, FAMILY)
        .add_set(blocked_set.clone())
        .add_set_elements(&blocked_set, &net_elements(blocked)?)
        .add_chain(chain(
            "forward",
            BaseChain::filter(FilterHook::Forward, Priority::Filter).policy(Policy::Accept),
        )?)
        .add_chain(chain(
            "input",
            BaseChain::filter(FilterHook::Input, Priority::Filter).policy(Policy::Accept),
        )?)
        .add_chain(chain(
            "postrouting",
            BaseChain::nat(NatHook::Postrouting, Priority::SrcNat),
        )?);
    let mut rules = Vec::new();
    rules.extend(refuse("forward", |r| {
        r.match_iif_prefix(HOST_VETH_GLOB)
            .match_oif_prefix(HOST_VETH_GLOB)
    }));
    rules.extend(refuse("forward", |r| {
        r.match_iif_prefix(HOST_VETH_GLOB)
            .match_daddr_in_set(SET_BLOCKED)
    }));
    // Nothing from a sandbox is for the host itself (its services, the worker's ports).
    rules.extend(refuse("input", |r| r.match_iif_prefix(HOST_VETH_GLOB)));
    // Between the host and a sandbox nothing is translated; out of the host, masquerade.
    rules.push(
        rule("postrouting")
            .match_oif_prefix(HOST_VETH_GLOB)
            .accept(),
    );
    rules.push(
        rule("postrouting")
            .match_saddr_v4(pool_range.network(), pool_range.prefix_len())
            .masquerade(),
    );
    for r in rules {
        tx = tx.add_rule(r);
    }
    Ok(tx)
}

/// The namespace table of a new pool slot: NAT of the guest's address to the slot's, the
/// input chain (only DNS to the gateway), the forward chain jumping to an empty `egress` chain
/// (so an unassigned slot refuses everything), and the sets.
pub fn namespace_table(
    tx: Transaction,
    slot: &SlotAddrs,
    blocked: &[Ipv4Net],
) -> Result<Transaction, RulesError> {
    let blocked_set = interval_set(SET_BLOCKED);
    let dns_allow = Set::new(TABLE, SET_DNS_ALLOW)
        .family(FAMILY)
        .key_type(SetKeyType::Ipv4Addr)
        .per_element_timeouts();
    let mut tx = tx
        .add_table(TABLE, FAMILY)
        .add_set(blocked_set.clone())
        .add_set_elements(&blocked_set, &net_elements(blocked)?)
        .add_set(interval_set(SET_ALLOW))
        .add_set(interval_set(SET_DENY))
        .add_set(dns_allow)
        .add_chain(
            Chain::new(TABLE, CHAIN_EGRESS)
                .map_err(RulesError)?
                .family(FAMILY),
        )
        .add_chain(chain(
            "forward",
            BaseChain::filter(FilterHook::Forward, Priority::Filter).policy(Policy::Drop),
        )?)
        .add_chain(chain(
            "input",
            BaseChain::filter(FilterHook::Input, Priority::Filter).policy(Policy::Drop),
        )?)
        .add_chain(chain(
            "postrouting",
            BaseChain::nat(NatHook::Postrouting, Priority::SrcNat),
        )?);
    for r in namespace_rules(slot)? {
        tx = tx.add_rule(r);
    }
    Ok(tx)
}

/// The fixed rules of a namespace table (see [`namespace_table`]).
pub fn namespace_rules(slot: &SlotAddrs) -> Result<Vec<Rule>, RulesError> {
    let established = CtState::ESTABLISHED | CtState::RELATED;
    let mut rules = vec![
        rule("forward").match_ct_state(established).accept(),
        rule("forward")
            .match_iif(TAP_NAME)
            .match_oif(NS_VETH_NAME)
            .try_jump(CHAIN_EGRESS)
            .map_err(RulesError)?,
    ];
    // Whatever `egress` did not accept from the guest is refused at once.
    rules.extend(refuse("forward", |r| r.match_iif(TAP_NAME)));
    rules.push(rule("input").match_ct_state(established).accept());
    rules.push(rule("input").match_iif("lo").accept());
    rules.push(
        rule("input")
            .match_iif(TAP_NAME)
            .match_daddr_v4(GUEST_GATEWAY, 32)
            .match_udp_dport(53)
            .accept(),
    );
    rules.extend(refuse("input", |r| r.match_iif(TAP_NAME)));
    rules.push(
        rule("postrouting")
            .match_oif(NS_VETH_NAME)
            .match_saddr_v4(GUEST_IP, 32)
            .snat(slot.ns_ip, None),
    );
    Ok(rules)
}

/// Gives a pooled namespace its sandbox's policy: fills the allow/deny sets and the `egress`
/// chain (blocked → allow → DNS-admitted → deny → the internet default).
pub fn apply_policy(tx: Transaction, policy: &EgressPolicy) -> Result<Transaction, RulesError> {
    let mut tx = tx;
    let allow = policy.allow_nets();
    if !allow.is_empty() {
        tx = tx.add_set_elements(&interval_set(SET_ALLOW), &net_elements(&allow)?);
    }
    let deny = policy.deny_nets();
    if !deny.is_empty() {
        tx = tx.add_set_elements(&interval_set(SET_DENY), &net_elements(&deny)?);
    }
    for r in egress_rules(policy) {
        tx = tx.add_rule(r);
    }
    Ok(tx)
}

/// The `egress` chain for `policy`.
pub fn egress_rules(policy: &EgressPolicy) -> Vec<Rule> {
    let mut rules = Vec::new();
    rules.extend(refuse(CHAIN_EGRESS, |r| r.match_daddr_in_set(SET_BLOCKED)));
    rules.push(rule(CHAIN_EGRESS).match_daddr_in_set(SET_ALLOW).accept());
    rules.push(
        rule(CHAIN_EGRESS)
            .match_daddr_in_set(SET_DNS_ALLOW)
            .accept(),
    );
    rules.extend(refuse(CHAIN_EGRESS, |r| r.match_daddr_in_set(SET_DENY)));
    if policy.allow_internet {
        rules.push(rule(CHAIN_EGRESS).accept());
    }
    rules
}

/// Admits `addrs` (answers for an allowed host name) for `ttl`.
pub fn admit_addresses(tx: Transaction, addrs: &[Ipv4Addr], ttl: Duration) -> Transaction {
    let set = Set::new(TABLE, SET_DNS_ALLOW)
        .family(FAMILY)
        .key_type(SetKeyType::Ipv4Addr)
        .per_element_timeouts();
    let elements: Vec<_> = addrs
        .iter()
        .map(|a| SetElement::ipv4(*a).with_timeout(ttl))
        .collect();
    tx.add_set_elements(&set, &elements)
}

/// Whether `name` is one of ours (for stale cleanup of host interfaces).
pub fn is_ours(name: &str) -> bool {
    name.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::DEFAULT_POOL_RANGE;

    fn text(rules: &[Rule]) -> Vec<String> {
        rules
            .iter()
            .map(|r| r.nft_syntax_stateless().unwrap_or_else(|| "?".into()))
            .collect()
    }

    #[test]
    fn namespace_rules_nat_the_guest_and_only_admit_dns() {
        let slot = SlotAddrs::new(DEFAULT_POOL_RANGE, 3).unwrap();
        let rules = text(&namespace_rules(&slot).unwrap());
        let all = rules.join("\n");
        assert!(all.contains("jump egress"), "{all}");
        assert!(all.contains("snat to 10.213.0.14"), "{all}");
        assert!(all.contains("ip saddr 169.254.0.2"), "{all}");
        assert!(all.contains("udp dport 53"), "{all}");
        assert!(all.contains("reject with tcp reset"), "{all}");
        // The jump comes before the catch-all refusal.
        let jump = rules
            .iter()
            .position(|r| r.contains("jump egress"))
            .unwrap();
        let refuse = rules
            .iter()
            .position(|r| r.starts_with("iifname \"tap0\"") && r.contains("reject"))
            .unwrap();
        assert!(jump < refuse, "{all}");
    }

    #[test]
    fn egress_rules_follow_the_policy_precedence() {
        let open = text(&egress_rules(&EgressPolicy::open()));
        assert!(
            open[0].contains("@blocked") && open[0].contains("reset"),
            "{open:?}"
        );
        assert!(
            open[2].contains("@allow") && open[2].ends_with("accept"),
            "{open:?}"
        );
        assert!(open[3].contains("@dns_allow"), "{open:?}");
        assert!(open[4].contains("@deny"), "{open:?}");
        assert_eq!(
            open.last().unwrap(),
            "accept",
            "internet on: default accept"
        );
        let closed = text(&egress_rules(&EgressPolicy::default()));
        assert_eq!(
            closed.len(),
            open.len() - 1,
            "internet off: no default accept"
        );
        assert!(closed.last().unwrap().contains("@deny"), "{closed:?}");
    }

    #[test]
    fn overlapping_cidrs_are_merged_before_they_become_set_elements() {
        let nets: Vec<Ipv4Net> = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.0/25",
            "192.0.2.128/25",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        assert_eq!(net_elements(&nets).unwrap().len(), 2);
        assert!(net_elements(&[]).unwrap().is_empty());
    }
}
