//! Names and addresses: what every guest sees (the same in every sandbox, so a snapshot clone
//! needs no reconfiguration) and what each pool slot gets on the host side (a unique /30).
//!
//! Inside a sandbox's namespace the guest's tap is `tap0` with the gateway address
//! [`GUEST_GATEWAY`], the guest is [`GUEST_IP`] with MAC [`GUEST_MAC`], and the namespace's end
//! of the veth pair is `eth0`. On the host, slot `k` is namespace `roost-n<k>` and host veth
//! `roost-v<k>`, holding the first usable address of the `k`-th /30 of the pool range; the
//! namespace end holds the second and is what the guest's traffic is translated to.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Prefix of every namespace and host interface this crate creates (stale cleanup removes
/// exactly these).
pub const PREFIX: &str = "roost-";
/// The guest's address; every sandbox uses the same one. Link-local, so it never shadows a
/// destination on the internet or the host's networks. Keep in sync with the agent's
/// `init/network.rs`.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
/// The guest's gateway and DNS server: the tap's address inside the namespace.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
/// Prefix length of the guest link.
pub const GUEST_PREFIX_LEN: u8 = 30;
/// The guest's MAC (locally administered, unicast); every sandbox uses the same one.
pub const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xa9, 0xfe, 0x00, 0x02];
/// The tap's MAC, the guest's gateway (the same in every namespace): a guest keeps its ARP
/// entry for the gateway across a pause, a snapshot and a restore into another namespace, so
/// a tap with a new random MAC would silently drop everything it sends.
pub const GATEWAY_MAC: [u8; 6] = [0x06, 0x00, 0xa9, 0xfe, 0x00, 0x01];
/// The tap device inside each namespace.
pub const TAP_NAME: &str = "tap0";
/// The namespace's end of the veth pair.
pub const NS_VETH_NAME: &str = "eth0";
/// Default host-side range the per-slot /30s are carved from.
pub const DEFAULT_POOL_RANGE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 213, 0, 0), 16) {
    Ok(net) => net,
    Err(_) => panic!("valid constant"),
};

/// `GUEST_MAC` as `06:00:a9:fe:00:02`.
pub fn guest_mac_string() -> String {
    format_mac(&GUEST_MAC)
}

/// A MAC as six colon-separated lower-case hex bytes.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why a slot has no addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("slot {slot} is outside the pool range {range} ({capacity} slots of /30)")]
    SlotOutOfRange {
        slot: u32,
        range: Ipv4Net,
        capacity: u32,
    },
    #[error("the pool range {0} is smaller than one /30")]
    RangeTooSmall(Ipv4Net),
}

/// Names and addresses of one pool slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAddrs {
    /// Slot number (unique among live slots on this host).
    pub slot: u32,
    /// Network namespace name (`roost-n<slot>`).
    pub netns: String,
    /// Host end of the veth pair (`roost-v<slot>`).
    pub host_veth: String,
    /// The slot's /30.
    pub net: Ipv4Net,
    /// Address of the host end.
    pub host_ip: Ipv4Addr,
    /// Address of the namespace end: the guest's traffic leaves the namespace from it.
    pub ns_ip: Ipv4Addr,
}

/// How many /30 slots `range` holds.
pub fn capacity(range: Ipv4Net) -> u32 {
    // A /30 holds 4 addresses; a range shorter than /30 holds 2^(30 - len) of them.
    match range.prefix_len() {
        len @ 0..=30 => 1u32.checked_shl(u32::from(30 - len)).unwrap_or(u32::MAX),
        _ => 0,
    }
}

impl SlotAddrs {
    /// The names and addresses of `slot` within `range`.
    pub fn new(range: Ipv4Net, slot: u32) -> Result<Self, AddrError> {
        let capacity = capacity(range);
        if capacity == 0 {
            return Err(AddrError::RangeTooSmall(range));
        }
        if slot >= capacity {
            return Err(AddrError::SlotOutOfRange {
                slot,
                range,
                capacity,
            });
        }
        let base = u32::from(range.network()) + slot * 4;
        let net =
            Ipv4Net::new(Ipv4Addr::from(base), 30).map_err(|_| AddrError::RangeTooSmall(range))?;
        Ok(Self {
            slot,
            netns: format!("{PREFIX}n{slot}"),
            host_veth: format!("{PREFIX}v{slot}"),
            net,
            host_ip: Ipv4Addr::from(base + 1),
            ns_ip: Ipv4Addr::from(base + 2),
        })
    }
}

/// The slot number of a namespace or host veth name this crate made (`roost-n7` → 7).
pub fn slot_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = rest.strip_prefix('n').or_else(|| rest.strip_prefix('v'))?;
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_get_consecutive_slash_30s_and_short_names() {
        let a = SlotAddrs::new(DEFAULT_POOL_RANGE, 0).unwrap();
        assert_eq!(a.netns, "roost-n0");
        assert_eq!(a.host_veth, "roost-v0");
        assert_eq!(a.net.to_string(), "10.213.0.0/30");
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(a.ns_ip, Ipv4Addr::new(10, 213, 0, 2));
        let b = SlotAddrs::new(DEFAULT_POOL_RANGE, 65).unwrap();
        assert_eq!(b.net.to_string(), "10.213.1.4/30");
        assert_eq!(b.host_ip, Ipv4Addr::new(10, 213, 1, 5));
        let last = SlotAddrs::new(DEFAULT_POOL_RANGE, 16383).unwrap();
        assert_eq!(last.ns_ip, Ipv4Addr::new(10, 213, 255, 254));
        // Linux interface names are at most 15 bytes.
        assert!(last.host_veth.len() <= 15, "{}", last.host_veth);
    }

    #[test]
    fn slots_beyond_the_range_are_refused() {
        assert_eq!(capacity(DEFAULT_POOL_RANGE), 16384);
        assert!(matches!(
            SlotAddrs::new(DEFAULT_POOL_RANGE, 16384),
            Err(AddrError::SlotOutOfRange {
                capacity: 16384,
                ..
            })
        ));
        let tiny: Ipv4Net = "10.0.0.0/31".parse().unwrap();
        assert_eq!(SlotAddrs::new(tiny, 0), Err(AddrError::RangeTooSmall(tiny)));
        let one: Ipv4Net = "10.0.0.8/30".parse().unwrap();
        assert_eq!(capacity(one), 1);
        assert_eq!(
            SlotAddrs::new(one, 0).unwrap().host_ip,
            Ipv4Addr::new(10, 0, 0, 9)
        );
    }

    #[test]
    fn names_parse_back_to_slots() {
        assert_eq!(slot_of("roost-n12"), Some(12));
        assert_eq!(slot_of("roost-v0"), Some(0));
        for other in [
            "roost-x1",
            "roost-n",
            "roost-n01",
            "eth0",
            "roost-nabc",
            "roost-v-1",
        ] {
            assert_eq!(slot_of(other), None, "{other}");
        }
    }

    #[test]
    fn the_guest_link_is_a_link_local_slash_30() {
        let net = Ipv4Net::new(GUEST_GATEWAY, GUEST_PREFIX_LEN)
            .unwrap()
            .trunc();
        assert!(net.contains(&GUEST_IP));
        assert!(GUEST_IP.is_link_local());
        assert_eq!(guest_mac_string(), "06:00:a9:fe:00:02");
        assert_eq!(GUEST_MAC[0] & 0b11, 0b10, "locally administered unicast");
    }
}
