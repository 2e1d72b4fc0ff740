//! The guest's loopback interface. The kernel creates `lo` down, and nothing else in the guest
//! brings it up, while port forwarding connects to `127.0.0.1:PORT`: so PID 1 brings it up
//! before serving the channel in a VM. (It is system setup; it lives here because the channel
//! is what needs it, and can move into init's setup when the guest gets real networking.)

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Sets `IFF_UP` on `lo` (a no-op when it is up already).
pub fn bring_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain old data for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = libc::c_char::from_ne_bytes([*byte]);
    }
    // SAFETY: valid socket, and `request` is a valid `ifreq` that outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let up = libc::c_short::try_from(libc::IFF_UP).map_err(io::Error::other)?;
    // SAFETY: SIOCGIFFLAGS filled the union's `ifru_flags` member, so reading it is defined.
    unsafe { request.ifr_ifru.ifru_flags |= up };
    // SAFETY: as above; SIOCSIFFLAGS reads the name and flags.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bringing_up_an_interface_that_is_up_is_harmless() {
        // On a developer machine lo is up already: the call must succeed (as root) and leave
        // it up; loopback connections keep working.
        super::bring_up().expect("lo flags (needs root)");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    }
}
