//! An address-range bus: maps non-overlapping `[base, base + len)` ranges to devices, so a vCPU
//! thread can dispatch an MMIO or port-I/O exit to the device that owns the address.
//!
//! One `Bus` type serves both address spaces: the VM keeps one for MMIO and one for port I/O.
//! Devices sit behind `Arc<Mutex<_>>` because every vCPU thread dispatches to the same device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on the MMIO or port-I/O bus; offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the vCPU threads.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a device could not be inserted into a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps past the end of the address space.
    #[error("invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// Address ranges → devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self.ranges.iter().map(|(b, e)| (*b, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`; refuses empty, wrapping or overlapping ranges.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlapping = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(other_base, other)| **other_base + other.len > base);
        if let Some((other_base, other)) = overlapping {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: *other_base,
                other_len: other.len,
            });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device owning `addr` and `addr`'s offset into it.
    pub fn resolve(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((offset, &entry.device))
    }

    /// Dispatches a read; returns false when no device owns `addr` (the caller then reads as
    /// all-ones, like an open bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler panicked on one vCPU
/// must not take every other vCPU down with it.
fn lock(device: &SharedBusDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xff));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe { last_write: None }))
    }

    #[test]
    fn dispatches_by_offset_within_range() {
        let mut bus = Bus::new();
        let dev = probe();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fb, &mut buf));
        assert_eq!(buf, [3]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, Some((7, vec![7])));
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x1000, 0x1000).unwrap();
        assert!(matches!(
            bus.insert(probe(), 0x1fff, 2),
            Err(BusError::Overlap {
                other_base: 0x1000,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(probe(), 0x0800, 0x801),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(probe(), 5, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(probe(), 0x2000, 0x1000).unwrap();
        bus.insert(probe(), 0x0, 0x1000).unwrap();
    }
}
