//! The guest's egress link, when the VM has a virtio-net device (`eth0`).
//!
//! Every sandbox, and every clone of a snapshot, has the same address: [`GUEST_IP`]/30 with
//! [`GATEWAY`] as default route and DNS server. The worker puts each sandbox's tap in its own
//! network namespace and translates this address there (`worker/net`, `docs/networking.md`),
//! so a restored clone needs no reconfiguration. Keep the constants in sync with
//! `roost_net::addr`.
//!
//! The root filesystem is read-only, so the resolver configuration is written to `/run` and
//! bind-mounted over `/etc/resolv.conf`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::mount::{MsFlags, mount};

/// The interface a virtio-net device shows up as.
pub const INTERFACE: &str = "eth0";
/// The guest's address (the same in every sandbox).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
/// Netmask of the guest link (/30).
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 252);
/// The gateway and DNS server (the tap's address in the sandbox's namespace).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
/// Where the resolver configuration is written before being mounted over /etc/resolv.conf.
const RUN_RESOLV_CONF: &str = "/run/resolv.conf";

/// Why the link could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot {0} on {INTERFACE}")]
    Ioctl(&'static str, #[source] io::Error),
    #[error("cannot write {RUN_RESOLV_CONF}")]
    ResolvConf(#[source] io::Error),
    #[error("cannot bind-mount {RUN_RESOLV_CONF} over /etc/resolv.conf")]
    MountResolvConf(#[source] nix::Error),
}

/// Configures `eth0` if the VM has one; `Ok(false)` when it has none (no egress).
pub fn configure() -> Result<bool, NetworkError> {
    if !Path::new("/sys/class/net").join(INTERFACE).exists() {
        return Ok(false);
    }
    let socket = inet_socket().map_err(|e| NetworkError::Ioctl("open a socket", e))?;
    set_addr(&socket, libc::SIOCSIFADDR, GUEST_IP)
        .map_err(|e| NetworkError::Ioctl("set the address", e))?;
    set_addr(&socket, libc::SIOCSIFNETMASK, NETMASK)
        .map_err(|e| NetworkError::Ioctl("set the netmask", e))?;
    set_up(&socket).map_err(|e| NetworkError::Ioctl("bring the link up", e))?;
    add_default_route(&socket, GATEWAY)
        .map_err(|e| NetworkError::Ioctl("add the default route", e))?;
    std::fs::write(RUN_RESOLV_CONF, resolv_conf()).map_err(NetworkError::ResolvConf)?;
    if Path::new("/etc/resolv.conf").exists() {
        mount(
            Some(RUN_RESOLV_CONF),
            "/etc/resolv.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(NetworkError::MountResolvConf)?;
    }
    Ok(true)
}

/// The resolver configuration: the gateway only.
pub fn resolv_conf() -> String {
    format!("nameserver {GATEWAY}\n")
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn request() -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(INTERFACE.bytes()) {
        *slot = libc::c_char::from_ne_bytes([byte]);
    }
    request
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` and `sockaddr` are both 16 bytes of plain data; the kernel reads
    // the address family first, as this reinterpretation intends.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn set_addr(socket: &OwnedFd, op: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
    let mut request = request();
    request.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: valid socket, and `request` is a valid `ifreq` (name and address set) that
    // outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), op, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_up(socket: &OwnedFd) -> io::Result<()> {
    let mut request = request();
    // SAFETY: valid socket and `ifreq` that outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let up = libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING).map_err(io::Error::other)?;
    // SAFETY: SIOCGIFFLAGS filled the union's `ifru_flags` member, so reading it is defined.
    unsafe { request.ifr_ifru.ifru_flags |= up };
    // SAFETY: as above; SIOCSIFFLAGS reads the name and flags.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn add_default_route(socket: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    // SAFETY: `rtentry` is plain old data for which all-zero bytes are a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: valid socket; SIOCADDRT reads a `rtentry` that outlives the call (its `rt_dev`
    // pointer is null: the kernel picks the interface that reaches the gateway).
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &route) } < 0 {
        let err = io::Error::last_os_error();
        // A restored clone already has its route.
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_link_is_one_slash_30_with_the_gateway_in_it() {
        let mask = u32::from(NETMASK);
        assert_eq!(mask.leading_ones(), 30);
        assert_eq!(u32::from(GUEST_IP) & mask, u32::from(GATEWAY) & mask);
        assert_eq!(resolv_conf(), "nameserver 169.254.0.1\n");
    }

    #[test]
    fn addresses_are_in_network_byte_order() {
        let sa = sockaddr_in(Ipv4Addr::new(169, 254, 0, 2));
        assert_eq!(i32::from(sa.sa_family), libc::AF_INET);
        // sin_port (2 bytes) then sin_addr, as on the wire.
        let bytes: Vec<u8> = sa.sa_data[2..6]
            .iter()
            .map(|b| b.to_ne_bytes()[0])
            .collect();
        assert_eq!(bytes, [169, 254, 0, 2]);
    }
}
