//! The host end of a virtio-net device: a tap interface, attached by name in the VMM's own
//! network namespace (`TUNSETIFF` on `/dev/net/tun`) or handed over as an open fd by whoever
//! started the VMM inside the sandbox's namespace.
//!
//! The tap is opened `IFF_TAP | IFF_NO_PI` without `IFF_VNET_HDR`: frames are plain Ethernet and
//! the device writes the (all-zero, no offloads) virtio-net header itself. Non-blocking, so the
//! event loop never waits on it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;

vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);
vmm_sys_util::ioctl_ior_nr!(TUNGETIFF, b'T' as u32, 210, libc::c_uint);

/// Why the tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name `{0}` is empty or longer than {MAX_NAME_LEN} bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap `{0}` (does it exist in this network namespace?)")]
    Attach(String, #[source] io::Error),
    #[error("fd {0} is not an attached tap")]
    NotATap(RawFd, #[source] io::Error),
    #[error("cannot make the tap non-blocking")]
    NonBlocking(#[source] io::Error),
}

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name, then the flags (the rest of the
/// union is padding).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaches to the existing tap `name` in this process's network namespace.
pub fn open_by_name(name: &str) -> Result<File, TapError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(TapError::BadName(name.to_owned()));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI)
        .map_err(|e| TapError::Attach(name.to_owned(), io::Error::other(e)))?;
    let mut req = IfReq {
        name: [0; 16],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write back) a `struct ifreq`, which `IfReq` lays out
    // with the same size (40 bytes); `tun` is an open /dev/net/tun fd.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&tun, TUNSETIFF(), &mut req) };
    if ret < 0 {
        return Err(TapError::Attach(
            name.to_owned(),
            io::Error::last_os_error(),
        ));
    }
    Ok(tun)
}

/// Takes over an fd the parent passed in, after checking it is an attached tap.
pub fn from_fd(fd: RawFd) -> Result<File, TapError> {
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes a `struct ifreq` into `req` (40 bytes, as laid out); on a
    // non-tun fd it fails with EBADFD/ENOTTY/EBADF and writes nothing.
    let ret = unsafe {
        libc::ioctl(
            fd,
            libc::c_ulong::from(TUNGETIFF()),
            std::ptr::from_mut(&mut req),
        )
    };
    if ret < 0 {
        return Err(TapError::NotATap(fd, io::Error::last_os_error()));
    }
    // SAFETY: the fd is open (TUNGETIFF succeeded on it) and was handed to this process for
    // the device to own; nothing else in this process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = File::from(owned);
    set_nonblocking(&file)?;
    Ok(file)
}

fn set_nonblocking(file: &File) -> Result<(), TapError> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on an fd this function borrows; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(TapError::NonBlocking(io::Error::last_os_error()));
    }
    // SAFETY: F_SETFL on the same fd with an integer argument; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(TapError::NonBlocking(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "a-name-that-is-too-long", "nul\0"] {
            assert!(
                matches!(open_by_name(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
        assert_eq!(std::mem::size_of::<IfReq>(), 40, "sizeof(struct ifreq)");
    }

    #[test]
    fn an_fd_that_is_not_a_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        use std::os::fd::IntoRawFd;
        let fd = file.into_raw_fd();
        assert!(matches!(from_fd(fd), Err(TapError::NotATap(..))));
        // SAFETY: `fd` came from `into_raw_fd` above and from_fd refused it without taking it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}
