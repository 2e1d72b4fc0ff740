//! virtio-mmio devices (owned by the virtio side of the crate; placeholder until it lands).
