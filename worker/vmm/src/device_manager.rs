//! Puts devices on the VM: the legacy PC devices on the port-I/O bus, virtio devices in MMIO
//! slots with their interrupts and queue notifications wired into KVM, their names on the kernel
//! command line, and their event handlers on the device event loop.
//!
//! Virtio layout: 4 KiB slots from 0xd000_0000 and GSIs from 5 (`layout`); one irqfd per device
//! and one ioeventfd per queue on `QueueNotify` (datamatch = queue index), so neither interrupts
//! nor queue kicks go through user space on the vCPU side.
//!
//! The manager keeps a typed handle of every device ([`DeviceHandles`]) so a running VM can
//! save their state; saving and restoring the whole set is in [`persist`].

mod persist;

pub use persist::{DeviceManagerState, DeviceRestoreArgs, VirtioDeviceSnapshot, VirtioSlotState};

use std::fs::File;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{ConsoleSink, I8042, SerialDevice};
use crate::devices::virtio::{
    self, Block, MmioTransport, Net, Rng, VirtioDevice, VirtioInterrupt, Vsock,
};
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::exit::{ExitCoordinator, ShutdownReason, VmExit};
use crate::layout;
use crate::vm::Vm;

/// Offset of the virtio-mmio `QueueNotify` register (written with the queue index).
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("could not create the serial log {path}")]
    SerialLog {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("could not register an irqfd for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("could not register an ioeventfd at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("could not place a device on the bus")]
    Bus(#[from] BusError),
    #[error("too many virtio devices: GSIs run out after {0}")]
    TooManyDevices(usize),
    #[error("could not create the {0} device")]
    Create(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    #[error("could not add {0} to the kernel command line")]
    Cmdline(&'static str, #[source] linux_loader::cmdline::Error),
    #[error("could not set up the device event loop")]
    EventLoop(#[from] EventLoopError),
    #[error("could not restore the {0} device")]
    Restore(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    #[error("the snapshot has a {0} device but no host path was given for it: {1}")]
    MissingHostPath(&'static str, &'static str),
}

/// A virtio device with its concrete type (for saving its state).
#[derive(Clone)]
pub enum VirtioHandle {
    Block(Arc<Mutex<Block>>),
    Vsock(Arc<Mutex<Vsock>>),
    Rng(Arc<Mutex<Rng>>),
    Net(Arc<Mutex<Net>>),
}

impl VirtioHandle {
    /// The device as its transport sees it.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Vsock(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
            VirtioHandle::Net(d) => d.clone(),
        }
    }

    /// The device as the event loop sees it.
    pub fn subscriber(&self) -> Subscriber {
        match self {
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Vsock(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
            VirtioHandle::Net(d) => d.clone(),
        }
    }
}

impl std::fmt::Debug for VirtioHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioHandle").finish_non_exhaustive()
    }
}

/// One attached virtio device and its transport.
#[derive(Clone, Debug)]
pub struct VirtioSlot {
    pub name: &'static str,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub device: VirtioHandle,
}

/// Typed handles of every device of a VM (shared with the buses and the event loop).
#[derive(Clone, Default)]
pub struct DeviceHandles {
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    pub i8042: Option<Arc<Mutex<I8042>>>,
    pub virtio: Vec<VirtioSlot>,
}

impl std::fmt::Debug for DeviceHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandles")
            .field(
                "virtio",
                &self.virtio.iter().map(|s| s.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The devices of one VM, before it runs.
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub event_loop: EventLoop,
    pub handles: DeviceHandles,
    next_virtio_slot: usize,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .finish_non_exhaustive()
    }
}

/// The MMIO base and GSI of virtio slot `index`.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    let gsi = u32::try_from(index)
        .ok()
        .and_then(|i| layout::FIRST_VIRTIO_GSI.checked_add(i))
        .filter(|gsi| *gsi <= layout::LAST_GSI)?;
    let offset = u64::try_from(index)
        .ok()?
        .checked_mul(layout::VIRTIO_MMIO_SLOT_SIZE)?;
    Some((layout::VIRTIO_MMIO_BASE + offset, gsi))
}

impl DeviceManager {
    pub fn new() -> Result<Self, DeviceError> {
        Ok(Self {
            pio: Bus::new(),
            mmio: Bus::new(),
            event_loop: EventLoop::new()?,
            handles: DeviceHandles::default(),
            next_virtio_slot: 0,
        })
    }

    /// COM1 (its output to the configured log/stdout, its interrupt an irqfd on GSI 4) and the
    /// i8042 (a reset ends the VM cleanly).
    pub fn attach_legacy(
        &mut self,
        vm: &Vm,
        config: &VmConfig,
        exits: &Arc<ExitCoordinator>,
    ) -> Result<(), DeviceError> {
        let (irq, sink) = serial_host_side(vm, &config.serial, exits)?;
        let serial = SerialDevice::new(irq, sink);
        let i8042 = I8042::new(i8042_reset(exits));
        self.place_legacy(serial, i8042)
    }

    /// Puts the serial port and the i8042 on the port-I/O bus.
    fn place_legacy(&mut self, serial: SerialDevice, i8042: I8042) -> Result<(), DeviceError> {
        let serial = Arc::new(Mutex::new(serial));
        self.pio.insert(
            serial.clone(),
            layout::SERIAL_PORT_BASE,
            layout::SERIAL_PORT_LEN,
        )?;
        let i8042 = Arc::new(Mutex::new(i8042));
        self.pio.insert(
            i8042.clone(),
            layout::I8042_PORT_BASE,
            layout::I8042_PORT_LEN,
        )?;
        self.handles.serial = Some(serial);
        self.handles.i8042 = Some(i8042);
        Ok(())
    }

    /// The configured virtio devices, in a fixed order: block (`/dev/vda`), vsock, rng.
    pub fn attach_virtio_devices(
        &mut self,
        vm: &Vm,
        memory: &GuestMemoryMmap,
        config: &VmConfig,
        cmdline: &mut Cmdline,
    ) -> Result<(), DeviceError> {
        if let Some(drive) = &config.rootfs {
            let block = virtio::block(virtio::BlockConfig {
                path: drive.path.clone(),
                read_only: drive.read_only,
                overlay: drive.overlay.clone(),
            })
            .map_err(|e| DeviceError::Create("block", Box::new(e)))?;
            self.attach_virtio(vm, memory, cmdline, "block", VirtioHandle::Block(block))?;
        }
        if let Some(vsock) = &config.vsock {
            let vsock = virtio::vsock(virtio::VsockConfig {
                guest_cid: u64::from(vsock.guest_cid),
                uds_path: vsock.uds_path.clone(),
            })
            .map_err(|e| DeviceError::Create("vsock", Box::new(e)))?;
            self.attach_virtio(vm, memory, cmdline, "vsock", VirtioHandle::Vsock(vsock))?;
        }
        if let Some(net) = &config.net {
            let net = virtio::net(virtio::net::NetConfig {
                tap: (&net.tap).into(),
                mac: net.mac,
            })
            .map_err(|e| DeviceError::Create("net", Box::new(e)))?;
            self.attach_virtio(vm, memory, cmdline, "net", VirtioHandle::Net(net))?;
        }
        if config.rng {
            let rng = virtio::rng().map_err(|e| DeviceError::Create("rng", Box::new(e)))?;
            self.attach_virtio(vm, memory, cmdline, "rng", VirtioHandle::Rng(rng))?;
        }
        Ok(())
    }

    /// One virtio device in the next slot, named on the kernel command line.
    pub fn attach_virtio(
        &mut self,
        vm: &Vm,
        memory: &GuestMemoryMmap,
        cmdline: &mut Cmdline,
        name: &'static str,
        handle: VirtioHandle,
    ) -> Result<(), DeviceError> {
        let device = handle.device();
        let (base, gsi) = self.place_virtio(vm, name, handle, |interrupt| {
            MmioTransport::new(memory.clone(), device, interrupt)
                .map_err(|e| DeviceError::Create(name, Box::new(e)))
        })?;
        cmdline
            .add_virtio_mmio_device(layout::VIRTIO_MMIO_SLOT_SIZE, GuestAddress(base), gsi, None)
            .map_err(|e| DeviceError::Cmdline(name, e))?;
        Ok(())
    }

    /// Wires the next slot (irqfd, one ioeventfd per queue, MMIO window, event loop) around the
    /// transport `make_transport` builds for the slot's interrupt; returns (base, GSI).
    fn place_virtio(
        &mut self,
        vm: &Vm,
        name: &'static str,
        handle: VirtioHandle,
        make_transport: impl FnOnce(Arc<VirtioInterrupt>) -> Result<MmioTransport, DeviceError>,
    ) -> Result<(u64, u32), DeviceError> {
        let index = self.next_virtio_slot;
        let (base, gsi) = virtio_slot(index).ok_or(DeviceError::TooManyDevices(index))?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.fd()
            .register_irqfd(&irq, gsi)
            .map_err(|source| DeviceError::Irqfd { gsi, source })?;
        let transport = make_transport(Arc::new(VirtioInterrupt::new(irq)))?;
        let notify = base + VIRTIO_MMIO_QUEUE_NOTIFY;
        for (queue, evt) in (0u32..).zip(transport.queue_events()) {
            vm.fd()
                .register_ioevent(evt, &IoEventAddress::Mmio(notify), queue)
                .map_err(|source| DeviceError::Ioeventfd {
                    addr: notify,
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, layout::VIRTIO_MMIO_SLOT_SIZE)?;
        self.event_loop.add(handle.subscriber());
        self.handles.virtio.push(VirtioSlot {
            name,
            transport,
            device: handle,
        });
        self.next_virtio_slot += 1;
        tracing::debug!(
            name,
            base = format_args!("{base:#x}"),
            gsi,
            "virtio device attached"
        );
        Ok((base, gsi))
    }
}

/// The serial console's interrupt (registered as irqfd on GSI 4) and output sink.
fn serial_host_side(
    vm: &Vm,
    serial: &crate::config::SerialConfig,
    exits: &Arc<ExitCoordinator>,
) -> Result<(EventFd, ConsoleSink), DeviceError> {
    let log = match &serial.log_path {
        Some(path) => Some(File::create(path).map_err(|source| DeviceError::SerialLog {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.fd()
        .register_irqfd(&irq, layout::SERIAL_GSI)
        .map_err(|source| DeviceError::Irqfd {
            gsi: layout::SERIAL_GSI,
            source,
        })?;
    Ok((irq, ConsoleSink::new(log, serial.to_stdout, exits.clone())))
}

/// What a guest reset through the i8042 does: end the VM cleanly.
fn i8042_reset(exits: &Arc<ExitCoordinator>) -> Box<dyn FnMut() + Send> {
    let exits = exits.clone();
    Box::new(move || exits.request(VmExit::Shutdown(ShutdownReason::KeyboardReset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_are_4k_apart_from_0xd0000000_with_gsis_5_to_23() {
        assert_eq!(virtio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_slot(1), Some((0xd000_1000, 6)));
        assert_eq!(virtio_slot(18), Some((0xd001_2000, 23)));
        assert_eq!(virtio_slot(19), None, "the IOAPIC has 24 pins");
    }

    #[test]
    fn every_slot_lies_in_the_mmio_gap_below_the_ioapic() {
        for index in 0..19 {
            let (base, _) = virtio_slot(index).unwrap();
            assert!(base >= layout::MMIO_GAP_START);
            assert!(base + layout::VIRTIO_MMIO_SLOT_SIZE <= layout::IOAPIC_START);
        }
    }
}
