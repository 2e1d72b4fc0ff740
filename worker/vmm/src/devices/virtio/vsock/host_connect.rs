//! Non-blocking connection to a host Unix listener.
//!
//! `UnixStream::connect` blocks while the listener's accept backlog is full, which would let a
//! guest stall the whole device thread by opening connections to a host listener that accepts
//! slowly. A non-blocking Unix-domain `connect` never waits: it connects at once or fails with
//! `EAGAIN` (backlog full), which the muxer answers with a RST like a missing listener.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects a non-blocking stream socket to the listener at `path`.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: zero is a valid bit pattern for this plain C struct.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = path.as_os_str().as_bytes();
    // Leave room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;

    // SAFETY: plain socket(2) call; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket this function owns; OwnedFd closes it on every path.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid, initialised sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn connects_and_is_non_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut stream = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            stream.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(stream.read(&mut buf).unwrap(), 1);
    }

    #[test]
    fn missing_listener_and_bad_paths_fail() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            connect_nonblocking(&dir.path().join("none"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn full_backlog_fails_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..10_000 {
                match connect_nonblocking(&path) {
                    Ok(stream) => held.push(stream),
                    Err(err) => {
                        let _ = tx.send(Some(err.kind()));
                        return;
                    }
                }
            }
            let _ = tx.send(None);
        });
        let outcome = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("connect blocked on a full backlog");
        assert_eq!(outcome, Some(io::ErrorKind::WouldBlock));
    }
}
