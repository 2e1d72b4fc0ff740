//! The virtio devices driven the way the guest's `virtio_mmio` driver drives them: every step
//! goes through the MMIO register file (`BusDevice` reads and writes), queues live in real guest
//! memory, and the devices run on a real event-manager loop. No KVM needed.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use roost_vmm::devices::bus::BusDevice;
use roost_vmm::devices::virtio::{
    self, BlockConfig, MmioTransport, VirtioDevice, VirtioInterrupt, VsockConfig,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::DescriptorTable;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

// virtio-mmio register offsets and status bits (virtio 1.2, section 4.2.2).
const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
const STATUS: u64 = 0x70;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_AVAIL_LOW: u64 = 0x90;
const QUEUE_USED_LOW: u64 = 0xa0;
const CONFIG: u64 = 0x100;

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// One split queue as the driver lays it out (descriptors written through virtio-queue's mock
/// `DescriptorTable`; its `MockSplitQueue` layout overlaps the rings, so it is not used).
struct Ring<'a> {
    desc: DescriptorTable<'a, GuestMemoryMmap>,
    desc_addr: u64,
    avail_addr: u64,
    used_addr: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let avail_addr = base + 16 * u64::from(size);
        let used_addr = (avail_addr + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used_addr + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; usize::try_from(end - avail_addr).unwrap()];
        mem.write_slice(&zeros, GuestAddress(avail_addr)).unwrap();
        Self {
            desc: DescriptorTable::new(mem, GuestAddress(base), size),
            desc_addr: base,
            avail_addr,
            used_addr,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }
}

/// The guest driver's view of one device.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    transport: MmioTransport,
    queues: Vec<Ring<'a>>,
}

impl<'a> Driver<'a> {
    fn new<D: VirtioDevice + 'static>(mem: &'a GuestMemoryMmap, device: Arc<Mutex<D>>) -> Self {
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let transport = MmioTransport::new(mem.clone(), device, irq).unwrap();
        Self {
            mem,
            transport,
            queues: Vec::new(),
        }
    }

    fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn device_features(&mut self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read(DEVICE_FEATURES));
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read(DEVICE_FEATURES));
        low | (high << 32)
    }

    /// The Linux driver's probe sequence: reset, negotiate `accept` ∩ offered features, set
    /// up every queue with `size` entries, DRIVER_OK. Returns the final status register.
    fn probe(&mut self, accept: u64, size: u16) -> u32 {
        assert_eq!(self.read(MAGIC), 0x7472_6976);
        assert_eq!(self.read(VERSION), 2);
        self.write(STATUS, 0);
        self.write(STATUS, ACKNOWLEDGE);
        self.write(STATUS, ACKNOWLEDGE | DRIVER);
        let features = self.device_features() & accept;
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(
            DRIVER_FEATURES,
            u32::try_from(features & 0xffff_ffff).unwrap(),
        );
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, u32::try_from(features >> 32).unwrap());
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(
            self.read(STATUS) & FEATURES_OK,
            0,
            "device refused the features"
        );
        self.queues.clear();
        let mut index = 0u32;
        loop {
            self.write(QUEUE_SEL, index);
            let max = self.read(QUEUE_NUM_MAX);
            if max == 0 {
                break;
            }
            let base = 0x1_0000 * u64::from(index);
            let ring = Ring::new(self.mem, base, size);
            self.write(QUEUE_NUM, u32::from(size));
            for (reg, addr) in [
                (QUEUE_DESC_LOW, ring.desc_addr),
                (QUEUE_AVAIL_LOW, ring.avail_addr),
                (QUEUE_USED_LOW, ring.used_addr),
            ] {
                self.write(reg, u32::try_from(addr).unwrap());
                self.write(reg + 4, 0);
            }
            self.write(QUEUE_READY, 1);
            self.queues.push(ring);
            index += 1;
        }
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        self.read(STATUS)
    }

    /// Makes a chain of (address, length, device-writable) buffers available and notifies.
    fn submit(&mut self, queue: usize, bufs: &[(u64, u32, bool)]) {
        let ring = &mut self.queues[queue];
        let first = ring.next_desc;
        let n = u16::try_from(bufs.len()).unwrap();
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            let desc = Descriptor::new(addr, len, flags, first + i + 1);
            ring.desc
                .store(first + i, RawDescriptor::from(desc))
                .unwrap();
        }
        ring.next_desc += n;
        let slot = ring.avail_addr + 4 + 2 * u64::from(ring.avail_idx % ring.size);
        self.mem.write_obj(first, GuestAddress(slot)).unwrap();
        ring.avail_idx += 1;
        self.mem
            .write_obj(ring.avail_idx, GuestAddress(ring.avail_addr + 2))
            .unwrap();
        self.write(QUEUE_NOTIFY, u32::try_from(queue).unwrap());
    }

    fn used_count(&self, queue: usize) -> u16 {
        let ring = &self.queues[queue];
        self.mem.read_obj(GuestAddress(ring.used_addr + 2)).unwrap()
    }

    fn used_len(&self, queue: usize, index: u16) -> u32 {
        let ring = &self.queues[queue];
        let elem = ring.used_addr + 4 + 8 * u64::from(index % ring.size) + 4;
        self.mem.read_obj(GuestAddress(elem)).unwrap()
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn manager_with<T: MutEventSubscriber + Send + 'static>(device: Arc<Mutex<T>>) -> Manager {
    let mut manager = Manager::new().unwrap();
    manager.add_subscriber(device);
    manager
}

fn run_until(manager: &mut Manager, what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        manager.run_with_timeout(10).unwrap();
    }
    assert!(done(), "timed out waiting for {what}");
}

#[test]
fn block_device_serves_reads_and_refuses_writes_when_read_only() {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    let contents: Vec<u8> = (0..4096u32).map(|i| (i % 199) as u8).collect();
    image.write_all(&contents).unwrap();
    let block = virtio::block(BlockConfig {
        path: image.path().to_owned(),
        read_only: true,
        overlay: None,
    })
    .unwrap();
    let mut manager = manager_with(block.clone());
    let mem = memory();
    let mut driver = Driver::new(&mem, block);
    assert_eq!(driver.read(DEVICE_ID), 2);
    assert_ne!(
        driver.device_features() & (1 << 5),
        0,
        "VIRTIO_BLK_F_RO offered"
    );
    let mut capacity = [0u8; 8];
    driver.transport.read(CONFIG, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 8);
    let status = driver.probe(u64::MAX, 16);
    assert_eq!(status, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);

    // IN: sectors 2..4.
    let header = [0u32.to_le_bytes(), [0; 4]].concat();
    mem.write_slice(&header, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&2u64.to_le_bytes(), GuestAddress(0x10_0008))
        .unwrap();
    driver.submit(
        0,
        &[
            (0x10_0000, 16, false),
            (0x20_0000, 1024, true),
            (0x30_0000, 1, true),
        ],
    );
    run_until(&mut manager, "read completion", || {
        driver.used_count(0) == 1
    });
    assert_eq!(driver.used_len(0, 0), 1025);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    let mut data = vec![0u8; 1024];
    mem.read_slice(&mut data, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(data, contents[1024..2048]);
    assert_ne!(
        driver.read(INTERRUPT_STATUS) & 1,
        0,
        "used-ring interrupt pending"
    );
    driver.write(INTERRUPT_ACK, 1);
    assert_eq!(driver.read(INTERRUPT_STATUS), 0);

    // OUT on a read-only disk: IOERR, image unchanged.
    mem.write_slice(&1u32.to_le_bytes(), GuestAddress(0x10_0000))
        .unwrap();
    driver.submit(
        0,
        &[
            (0x10_0000, 16, false),
            (0x20_0000, 512, false),
            (0x30_0000, 1, true),
        ],
    );
    run_until(&mut manager, "write refusal", || driver.used_count(0) == 2);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 1);
    assert_eq!(std::fs::read(image.path()).unwrap(), contents);
}

#[test]
fn rng_device_fills_buffers_and_stops_after_driver_reset() {
    let rng = virtio::rng().unwrap();
    let mut manager = manager_with(rng.clone());
    let mem = memory();
    let mut driver = Driver::new(&mem, rng.clone());
    assert_eq!(driver.read(DEVICE_ID), 4);
    driver.probe(u64::MAX, 16);
    driver.submit(0, &[(0x20_0000, 256, true)]);
    run_until(&mut manager, "entropy", || driver.used_count(0) == 1);
    assert_eq!(driver.used_len(0, 0), 256);
    let mut data = [0u8; 256];
    mem.read_slice(&mut data, GuestAddress(0x20_0000)).unwrap();
    assert!(data.iter().any(|&b| b != 0));

    driver.write(STATUS, 0);
    assert!(!rng.lock().unwrap().is_activated());
    driver.submit(0, &[(0x20_0000, 256, true)]);
    for _ in 0..5 {
        manager.run_with_timeout(10).unwrap();
    }
    assert_eq!(
        driver.used_count(0),
        1,
        "a reset device must not touch the queue"
    );
}

#[test]
fn vsock_device_connects_the_guest_to_a_host_listener() {
    let dir = tempfile::tempdir().unwrap();
    let uds_path = dir.path().join("vm.vsock");
    let listener = UnixListener::bind(dir.path().join("vm.vsock_1024")).unwrap();
    let vsock = virtio::vsock(VsockConfig {
        guest_cid: 3,
        uds_path: uds_path.clone(),
    })
    .unwrap();
    let mut manager = manager_with(vsock.clone());
    let mem = memory();
    let mut driver = Driver::new(&mem, vsock.clone());
    assert_eq!(driver.read(DEVICE_ID), 19);
    let mut cid = [0u8; 8];
    driver.transport.read(CONFIG, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 3);
    driver.probe(u64::MAX, 64);
    assert_eq!(driver.queues.len(), 3);

    // rx buffers, then REQUEST (guest port 5000 → host port 1024) + RW "hello" on tx.
    for i in 0..4u64 {
        driver.submit(
            0,
            &[
                (0x40_0000 + i * 0x100, 44, true),
                (0x50_0000 + i * 0x1000, 4096, true),
            ],
        );
    }
    let header = |op: u16, len: u32| {
        let mut h = [0u8; 44];
        h[0..8].copy_from_slice(&3u64.to_le_bytes());
        h[8..16].copy_from_slice(&2u64.to_le_bytes());
        h[16..20].copy_from_slice(&5000u32.to_le_bytes());
        h[20..24].copy_from_slice(&1024u32.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        h[28..30].copy_from_slice(&1u16.to_le_bytes());
        h[30..32].copy_from_slice(&op.to_le_bytes());
        h[36..40].copy_from_slice(&65536u32.to_le_bytes());
        h
    };
    mem.write_slice(&header(1, 0), GuestAddress(0x60_0000))
        .unwrap();
    driver.submit(1, &[(0x60_0000, 44, false)]);
    run_until(&mut manager, "RESPONSE", || driver.used_count(0) == 1);
    let mut reply = [0u8; 44];
    mem.read_slice(&mut reply, GuestAddress(0x40_0000)).unwrap();
    assert_eq!(u16::from_le_bytes([reply[30], reply[31]]), 2, "op RESPONSE");

    mem.write_slice(&header(5, 5), GuestAddress(0x60_1000))
        .unwrap();
    mem.write_slice(b"hello", GuestAddress(0x61_0000)).unwrap();
    driver.submit(1, &[(0x60_1000, 44, false), (0x61_0000, 5, false)]);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    run_until(&mut manager, "tx consumed", || driver.used_count(1) == 2);
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    // Driver reset drops the connection: the host stream sees EOF.
    driver.write(STATUS, 0);
    manager.run_with_timeout(10).unwrap();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(vsock.lock().unwrap().muxer().connection_count(), 0);
}
