//! Loop devices for the dm-snapshot backend (the `loopdev-3` crate).
//!
//! Every loop device is attached with `LO_FLAGS_AUTOCLEAR`: the kernel detaches it when its
//! last user closes it. While a dm table uses it, dm holds it open; once the dm device is
//! removed and our handle dropped it goes away by itself, and if the worker dies before the dm
//! table is loaded, closing its file descriptors (process exit) detaches it. So a loop device
//! cannot outlive both its user and the worker.

use std::path::{Path, PathBuf};

use loopdev::{LoopControl, LoopDevice};

use super::DiskError;

/// Attempts at finding a free device: another process may take the one `LOOP_CTL_GET_FREE`
/// named before we attach to it.
const ATTACH_TRIES: usize = 8;

/// An attached loop device, detached when dropped (or when dm releases it, if later).
#[derive(Debug)]
pub struct Loop {
    device: LoopDevice,
    /// `major:minor`, as a dm table names devices.
    pub devno: String,
    pub path: PathBuf,
}

impl Loop {
    /// Attaches a free loop device to `file`.
    pub fn attach(file: &Path, read_only: bool) -> Result<Self, DiskError> {
        let err = |source| DiskError::Loop {
            path: file.to_owned(),
            source,
        };
        let control = LoopControl::open().map_err(err)?;
        let mut last = None;
        for _ in 0..ATTACH_TRIES {
            let device = control.next_free().map_err(err)?;
            match device
                .with()
                .read_only(read_only)
                .autoclear(true)
                .attach(file)
            {
                Ok(()) => {
                    let devno = format!(
                        "{}:{}",
                        device.major().map_err(err)?,
                        device.minor().map_err(err)?
                    );
                    let path = device.path().unwrap_or_default();
                    return Ok(Self {
                        device,
                        devno,
                        path,
                    });
                }
                // EBUSY: someone attached it between GET_FREE and SET_FD; take the next one.
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
                    last = Some(e)
                }
                Err(e) => return Err(err(e)),
            }
        }
        Err(err(last.unwrap_or_else(|| {
            std::io::Error::other("no free loop device")
        })))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // With autoclear set this only marks it for detach on last close (if dm still holds it)
        // or detaches now; ENXIO means it is already gone.
        if let Err(err) = self.device.detach()
            && err.raw_os_error() != Some(nix::errno::Errno::ENXIO as i32)
        {
            tracing::debug!(%err, path = %self.path.display(), "loop detach deferred to autoclear");
        }
    }
}
