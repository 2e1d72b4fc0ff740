//! Fresh entropy for a restored guest. Every clone of a snapshot resumes with the same kernel
//! random state; the host's bytes are mixed into the input pool and credited
//! (`RNDADDENTROPY`), then the CRNG is reseeded at once (`RNDRESEEDCRNG`) rather than at its
//! next scheduled reseed, so the very next `getrandom` of each clone differs.
//!
//! The ioctls are hand-declared with nix's macros: libc does not carry them. Both need
//! `CAP_SYS_ADMIN`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// The device the ioctls go to (`/dev/urandom` takes them as well; either feeds one pool).
const RANDOM_DEVICE: &str = "/dev/random";

// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`: the request
// code encodes the size of the two-int header (`_IOW('R', 0x03, int[2])`).
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>()),
    u32
);
// `_IO('R', 0x07)`.
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Mixes `bytes` into the kernel's pool, credits them in full, and reseeds the CRNG.
pub fn add(bytes: &[u8]) -> io::Result<()> {
    let info = rand_pool_info(bytes)?;
    let device = OpenOptions::new().write(true).open(RANDOM_DEVICE)?;
    // SAFETY: `info` is a complete rand_pool_info (header, then `buf_size` bytes) that lives
    // across the call; the kernel only reads it.
    unsafe { rnd_add_entropy(device.as_raw_fd(), info.as_ptr()) }.map_err(io::Error::from)?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    unsafe { rnd_reseed_crng(device.as_raw_fd()) }.map_err(io::Error::from)?;
    Ok(())
}

/// `struct rand_pool_info` for `bytes`, in 32-bit words (the kernel's alignment): entropy
/// count in bits, buffer size in bytes, then the bytes (the last word zero-padded).
fn rand_pool_info(bytes: &[u8]) -> io::Result<Vec<u32>> {
    let too_long = || io::Error::new(io::ErrorKind::InvalidInput, "too much entropy at once");
    let bits =
        u32::try_from(bytes.len().checked_mul(8).ok_or_else(too_long)?).map_err(|_| too_long())?;
    let size = u32::try_from(bytes.len()).map_err(|_| too_long())?;
    let mut info = Vec::with_capacity(2 + bytes.len().div_ceil(4));
    info.push(bits);
    info.push(size);
    for chunk in bytes.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info.push(u32::from_ne_bytes(word));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_codes_match_linux_random_h() {
        // From <linux/random.h>: RNDADDENTROPY 0x40085203, RNDRESEEDCRNG 0x5207.
        assert_eq!(
            nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>()),
            0x4008_5203
        );
        assert_eq!(nix::request_code_none!(b'R', 0x07), 0x5207);
    }

    #[test]
    fn the_pool_info_is_header_then_padded_bytes() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(info.len(), 4);
        assert_eq!((info[0], info[1]), (40, 5), "bits credited, bytes given");
        assert_eq!(info[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(info[3], u32::from_ne_bytes([5, 0, 0, 0]));
    }

    /// The real ioctls: they succeed as root (CI runs tests as root; adding host entropy to the
    /// pool is harmless) and are refused with `PermissionDenied` otherwise.
    #[test]
    fn the_ioctls_are_accepted_by_the_kernel_as_root() {
        let mut bytes = [0u8; 32];
        getrandom_bytes(&mut bytes);
        let result = add(&bytes);
        if nix::unistd::geteuid().is_root() {
            result.expect("RNDADDENTROPY and RNDRESEEDCRNG as root");
        } else {
            let error = result.expect_err("only root may credit entropy");
            assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        }
    }

    fn getrandom_bytes(bytes: &mut [u8]) {
        // SAFETY: getrandom writes at most `len` bytes to a live buffer of that length.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        assert_eq!(usize::try_from(n).unwrap(), bytes.len());
    }
}
