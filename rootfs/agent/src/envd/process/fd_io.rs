//! Non-blocking reads and writes on a raw descriptor (pipe end or PTY master) through tokio's
//! [`AsyncFd`]: one mechanism for both, where tokio's own pipe type refuses PTYs. Reads and
//! writes are cancel-safe (readiness-based), so they can sit in `select!`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;

/// A descriptor registered with the tokio reactor.
#[derive(Debug)]
pub struct AsyncDescriptor {
    inner: AsyncFd<OwnedFd>,
}

impl AsyncDescriptor {
    /// Makes `fd` non-blocking and registers it.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it is open, and it stays open
        // and the same descriptor until the AsyncFd (its owner) is dropped.
        let inner = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { inner })
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }

    /// Reads what is available; `Ok(0)` at end of input. A PTY master whose slave side has
    /// closed reports `EIO`, which is end of input too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|fd| match nix::unistd::read(fd.get_ref(), buf) {
                Ok(n) => Ok(n),
                Err(Errno::EIO) => Ok(0),
                Err(e) => Err(io::Error::from(e)),
            }) {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.inner.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipe_round_trip_and_eof() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (reader, writer) = (
            AsyncDescriptor::new(r).unwrap(),
            AsyncDescriptor::new(w).unwrap(),
        );
        writer.write_all(b"hello").await.unwrap();
        drop(writer);
        let mut buf = [0u8; 16];
        let n = reader.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
    }
}
