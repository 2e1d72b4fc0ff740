//! Register-level tests of the virtio-mmio transport with a recording test device.

use super::*;
use crate::devices::virtio::FEATURE_EVENT_IDX;
use crate::devices::virtio::device::ActivateError;
use vm_memory::GuestAddress;

const TEST_DEVICE_ID: u32 = 42;
const FEATURE_TEST: u64 = 1 << 3;

#[derive(Default)]
struct RecordingDevice {
    acked: u64,
    config: [u8; 8],
    activations: usize,
    resets: usize,
    active: bool,
    activated_queue_sizes: Vec<u16>,
    activated_event_idx: Vec<bool>,
}

impl VirtioDevice for RecordingDevice {
    fn device_type(&self) -> u32 {
        TEST_DEVICE_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | FEATURE_TEST | FEATURE_EVENT_IDX
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = usize::try_from(offset).unwrap();
        self.config[start..start + data.len()].copy_from_slice(data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.activations += 1;
        self.active = true;
        self.activated_queue_sizes = activation.queues.iter().map(|q| q.size()).collect();
        self.activated_event_idx = activation
            .queues
            .iter()
            .map(|q| q.event_idx_enabled())
            .collect();
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.active = false;
    }
}

struct Fixture {
    transport: MmioTransport,
    device: Arc<Mutex<RecordingDevice>>,
}

fn fixture() -> Fixture {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let device = Arc::new(Mutex::new(RecordingDevice::default()));
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let transport = MmioTransport::new(mem, device.clone(), irq).unwrap();
    Fixture { transport, device }
}

fn read32(t: &mut MmioTransport, offset: u32) -> u32 {
    let mut data = [0u8; 4];
    t.read(u64::from(offset), &mut data);
    u32::from_le_bytes(data)
}

fn write32(t: &mut MmioTransport, offset: u32, value: u32) {
    t.write(u64::from(offset), &value.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport) {
    write32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    write32(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1 (bit 32)
    write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write32(
        t,
        VIRTIO_MMIO_DRIVER_FEATURES,
        u32::try_from(FEATURE_TEST).unwrap(),
    );
    write32(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
}

/// Places queue `index` at `base` (desc 16 B/entry, avail, used) with `size` entries.
fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u32) {
    write32(t, VIRTIO_MMIO_QUEUE_SEL, index);
    write32(t, VIRTIO_MMIO_QUEUE_NUM, size);
    write32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
    write32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    write32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
    write32(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
    write32(t, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
    write32(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
    write32(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

const ALL_OK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

#[test]
fn identification_registers() {
    let mut f = fixture();
    let t = &mut f.transport;
    assert_eq!(read32(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read32(t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_ID), TEST_DEVICE_ID);
    assert_eq!(read32(t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(t.queue_events().len(), 2);
}

#[test]
fn device_features_are_paged_by_the_selector() {
    let mut f = fixture();
    let t = &mut f.transport;
    write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_FEATURES), (1 << 3) | (1 << 29));
    write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
    write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
}

#[test]
fn driver_features_are_masked_and_need_the_driver_state() {
    let mut f = fixture();
    // Before DRIVER is set, feature writes are ignored.
    write32(&mut f.transport, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(f.device.lock().unwrap().acked, 0);
    write32(
        &mut f.transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE,
    );
    write32(
        &mut f.transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    write32(&mut f.transport, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(
        f.device.lock().unwrap().acked,
        FEATURE_TEST | FEATURE_EVENT_IDX,
        "unoffered bits dropped"
    );
}

#[test]
fn features_ok_is_refused_without_version_1() {
    let mut f = fixture();
    let t = &mut f.transport;
    write32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    write32(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    write32(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(
        read32(t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
        0,
        "FEATURES_OK must stay clear"
    );
}

#[test]
fn queue_registers_need_features_ok_and_activation_hands_queues_over() {
    let mut f = fixture();
    // Before FEATURES_OK, queue writes are ignored.
    write32(&mut f.transport, VIRTIO_MMIO_QUEUE_SEL, 0);
    write32(&mut f.transport, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_QUEUE_READY), 0);

    negotiate(&mut f.transport);
    write32(&mut f.transport, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    write32(&mut f.transport, VIRTIO_MMIO_QUEUE_SEL, 9);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    setup_queue(&mut f.transport, 0, 16, 0x1_0000);
    setup_queue(&mut f.transport, 1, 4, 0x2_0000);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_QUEUE_READY), 1);
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_STATUS), ALL_OK);
    let device = f.device.lock().unwrap();
    assert_eq!(device.activations, 1);
    assert_eq!(device.activated_queue_sizes, vec![16, 4]);
    assert_eq!(
        device.activated_event_idx,
        vec![false, false],
        "EVENT_IDX not acked"
    );
}

#[test]
fn invalid_queue_sets_needs_reset_instead_of_activating() {
    let mut f = fixture();
    negotiate(&mut f.transport);
    setup_queue(&mut f.transport, 0, 16, 0x1_0000);
    // Queue 1's rings lie outside the 1 MiB of guest memory.
    setup_queue(&mut f.transport, 1, 8, 0x4000_0000);
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
    let status = read32(&mut f.transport, VIRTIO_MMIO_STATUS);
    assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(f.device.lock().unwrap().activations, 0);
    assert_eq!(
        read32(&mut f.transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_CONFIG_GENERATION), 1);
}

#[test]
fn queue_not_ready_refuses_activation() {
    let mut f = fixture();
    negotiate(&mut f.transport);
    setup_queue(&mut f.transport, 0, 16, 0x1_0000);
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
    assert_ne!(
        read32(&mut f.transport, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_eq!(f.device.lock().unwrap().activations, 0);
}

#[test]
fn reset_returns_everything_to_the_initial_state() {
    let mut f = fixture();
    negotiate(&mut f.transport);
    setup_queue(&mut f.transport, 0, 16, 0x1_0000);
    setup_queue(&mut f.transport, 1, 8, 0x2_0000);
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
    f.transport
        .interrupt()
        .trigger(InterruptKind::UsedRing)
        .unwrap();
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    write32(&mut f.transport, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_QUEUE_READY), 0);
    {
        let device = f.device.lock().unwrap();
        assert_eq!(device.resets, 1);
        assert_eq!(device.acked, 0);
        assert!(!device.active);
    }
    // The driver can bring the device up again.
    negotiate(&mut f.transport);
    setup_queue(&mut f.transport, 0, 16, 0x1_0000);
    setup_queue(&mut f.transport, 1, 8, 0x2_0000);
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
    assert_eq!(f.device.lock().unwrap().activations, 2);
}

#[test]
fn status_bits_cannot_be_cleared_without_reset() {
    let mut f = fixture();
    negotiate(&mut f.transport);
    write32(
        &mut f.transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE,
    );
    assert_eq!(
        read32(&mut f.transport, VIRTIO_MMIO_STATUS),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
    );
}

#[test]
fn interrupt_status_and_ack() {
    let mut f = fixture();
    f.transport
        .interrupt()
        .trigger(InterruptKind::UsedRing)
        .unwrap();
    f.transport
        .interrupt()
        .trigger(InterruptKind::Config)
        .unwrap();
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_INTERRUPT_STATUS), 3);
    write32(
        &mut f.transport,
        VIRTIO_MMIO_INTERRUPT_ACK,
        VIRTIO_MMIO_INT_VRING,
    );
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let mut f = fixture();
    write32(&mut f.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(f.transport.queue_events()[1].read().unwrap(), 1);
    assert!(f.transport.queue_events()[0].read().is_err());
    // A notify for a queue that does not exist is ignored.
    write32(&mut f.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 77);
}

#[test]
fn config_space_reads_and_writes_go_to_the_device() {
    let mut f = fixture();
    f.device.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
    let mut data = [0u8; 2];
    f.transport.read(0x104, &mut data);
    assert_eq!(data, [5, 6]);
    // Config writes need DRIVER.
    f.transport.write(0x100, &[9]);
    assert_eq!(f.device.lock().unwrap().config[0], 1);
    write32(
        &mut f.transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE,
    );
    write32(
        &mut f.transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    f.transport.write(0x100, &[9]);
    assert_eq!(f.device.lock().unwrap().config[0], 9);
}

#[test]
fn odd_sized_register_accesses_are_ignored() {
    let mut f = fixture();
    let mut data = [0xffu8; 2];
    f.transport.read(0, &mut data);
    assert_eq!(data, [0, 0]);
    f.transport.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
    assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_STATUS), 0);
    // Far out of range offsets neither panic nor change anything.
    f.transport.write(u64::MAX, &[1, 2, 3, 4]);
    f.transport.read(0xfc0, &mut [0u8; 4]);
}

#[test]
fn acked_event_idx_reaches_the_activated_queues() {
    let mut f = fixture();
    negotiate(&mut f.transport);
    // `negotiate` acked VERSION_1 and FEATURE_TEST; add EVENT_IDX (bit 29) before FEATURES_OK
    // by renegotiating from scratch.
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, 0);
    write32(
        &mut f.transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE,
    );
    write32(
        &mut f.transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    write32(&mut f.transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write32(&mut f.transport, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    write32(&mut f.transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write32(&mut f.transport, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 29);
    write32(
        &mut f.transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    setup_queue(&mut f.transport, 0, 16, 0x1_0000);
    setup_queue(&mut f.transport, 1, 8, 0x2_0000);
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
    assert_eq!(
        f.device.lock().unwrap().activated_event_idx,
        vec![true, true]
    );
}

#[test]
fn a_restored_transport_reactivates_its_device_with_the_saved_queues() {
    use crate::snapshot::Persist;
    let mut f = fixture();
    negotiate(&mut f.transport);
    setup_queue(&mut f.transport, 0, 16, 0x1_0000);
    setup_queue(&mut f.transport, 1, 8, 0x2_0000);
    write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
    f.transport
        .interrupt()
        .trigger(InterruptKind::UsedRing)
        .unwrap();
    let saved = f.transport.save();
    let device_state = VirtioDeviceStateFixture::activated(&saved);

    let mem = f.transport.mem.clone();
    let device = Arc::new(Mutex::new(RecordingDevice {
        acked: f.device.lock().unwrap().acked,
        ..Default::default()
    }));
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut restored = MmioTransport::restore(
        MmioRestoreArgs {
            mem,
            device: device.clone(),
            interrupt: irq,
            device_state,
        },
        &saved,
    )
    .unwrap();
    assert_eq!(read32(&mut restored, VIRTIO_MMIO_STATUS), ALL_OK);
    assert_eq!(read32(&mut restored, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    let dev = device.lock().unwrap();
    assert_eq!(dev.activations, 1, "re-activated once");
    assert_eq!(dev.activated_queue_sizes, [16, 8]);
    drop(dev);
    for evt in restored.queue_events() {
        assert_eq!(evt.read().unwrap(), 1, "every queue kicked once");
    }
    assert_eq!(restored.save(), saved);
}

#[test]
fn restore_refuses_another_device_type() {
    use crate::snapshot::Persist;
    let f = fixture();
    let saved = f.transport.save();
    let mut device_state = VirtioDeviceStateFixture::activated(&saved);
    device_state.device_type = 7;
    device_state.activated = false;
    let err = MmioTransport::restore(
        MmioRestoreArgs {
            mem: f.transport.mem.clone(),
            device: Arc::new(Mutex::new(RecordingDevice::default())),
            interrupt: Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            device_state,
        },
        &saved,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        MmioRestoreError::DeviceType {
            saved: 7,
            actual: TEST_DEVICE_ID
        }
    ));
}

/// Device state as a running device would report it: the transport's queues, activated.
struct VirtioDeviceStateFixture;

impl VirtioDeviceStateFixture {
    fn activated(t: &MmioTransportState) -> crate::devices::virtio::VirtioDeviceState {
        crate::devices::virtio::VirtioDeviceState {
            device_type: TEST_DEVICE_ID,
            avail_features: 0,
            acked_features: 0,
            activated: true,
            queues: t.queues.clone(),
        }
    }
}
