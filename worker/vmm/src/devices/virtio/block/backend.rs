//! Where a block device's sectors live: the image file itself (raw), or a copy-on-write
//! overlay over a read-only base image.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::overlay::Overlay;

/// The storage behind a disk.
#[derive(Debug)]
pub enum Backend {
    /// Positioned I/O on the image (read-only or writable as configured).
    Raw(File),
    /// Writes go to the overlay; the base is never written.
    Overlay(Overlay),
}

impl Backend {
    /// Reads `buf.len()` bytes at `offset` (the caller checked the range).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Backend::Raw(file) => file.read_exact_at(buf, offset),
            Backend::Overlay(overlay) => overlay.read_at(buf, offset),
        }
    }

    /// Writes `buf` at `offset` (the caller checked the range and that writes are allowed).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Backend::Raw(file) => file.write_all_at(buf, offset),
            Backend::Overlay(overlay) => overlay.write_at(buf, offset),
        }
    }

    /// Makes completed writes durable.
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Backend::Raw(file) => file.sync_data(),
            Backend::Overlay(overlay) => overlay.flush(),
        }
    }

    /// The overlay, mutably, if this disk has one.
    pub fn overlay_mut(&mut self) -> Option<&mut Overlay> {
        match self {
            Backend::Raw(_) => None,
            Backend::Overlay(overlay) => Some(overlay),
        }
    }
}
