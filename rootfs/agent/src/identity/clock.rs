//! The guest's wall clock. A restored snapshot's `CLOCK_REALTIME` stands where it was when the
//! snapshot was taken; the host's time replaces it.

use std::io;

/// Sets `CLOCK_REALTIME` to `unix_ns`; returns the step (new minus old) in nanoseconds.
pub fn set_realtime(unix_ns: u64) -> io::Result<i64> {
    let before = now_ns();
    let time = timespec(unix_ns)?;
    // SAFETY: clock_settime reads one timespec from a pointer to a live local.
    let result = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    let step = i128::from(unix_ns) - before;
    Ok(i64::try_from(step).unwrap_or(if step < 0 { i64::MIN } else { i64::MAX }))
}

/// The current `CLOCK_REALTIME` in nanoseconds (may be before the epoch in a broken guest).
fn now_ns() -> i128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a pointer to a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec)
}

fn timespec(unix_ns: u64) -> io::Result<libc::timespec> {
    let seconds = unix_ns / 1_000_000_000;
    let nanos = unix_ns % 1_000_000_000;
    Ok(libc::timespec {
        tv_sec: libc::time_t::try_from(seconds)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "time out of range"))?,
        // Below 10^9: always fits.
        tv_nsec: libc::c_long::try_from(nanos).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanoseconds_split_into_seconds_and_nanoseconds() {
        let time = timespec(1_700_000_000_123_456_789).unwrap();
        assert_eq!((time.tv_sec, time.tv_nsec), (1_700_000_000, 123_456_789));
        let time = timespec(999_999_999).unwrap();
        assert_eq!((time.tv_sec, time.tv_nsec), (0, 999_999_999));
    }

    #[test]
    fn now_is_after_2020() {
        assert!(now_ns() > 1_577_836_800_000_000_000);
    }
}
