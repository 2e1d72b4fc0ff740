//! The block device model: the image file, the configuration space and queue processing.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::backend::Backend;
use super::layer::{self, DiskLayer, DiskManifest, LayerError};
use super::overlay::{Overlay, OverlayError};
use super::request;
use crate::devices::virtio::device::{ActivateError, Activation, VirtioDevice, read_config_bytes};
use crate::devices::virtio::lifecycle::DeviceLifecycle;
use crate::devices::virtio::queue_drain::drain_queue;
use crate::devices::virtio::ratelimit::guest_warn;
use crate::devices::virtio::{FEATURE_EVENT_IDX, FEATURE_VERSION_1};

/// Bytes per virtio-blk sector (fixed by the specification).
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered to the driver.
const QUEUE_SIZE: u16 = 256;
/// Length of the disk id returned by GET_ID.
const ID_LEN: usize = 20;

/// How to back a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw disk image (with `overlay`: the base image, opened read-only).
    pub path: PathBuf,
    /// Offer the disk read-only (`VIRTIO_BLK_F_RO`) and refuse writes.
    pub read_only: bool,
    /// A copy-on-write overlay file over `path`: created when missing or empty, reopened
    /// otherwise. The guest sees a writable disk; `path` is never written.
    pub overlay: Option<PathBuf>,
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image's size could not be determined.
    #[error("cannot determine the size of disk image {path}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image is smaller than one sector.
    #[error("disk image {path} is empty (smaller than one 512-byte sector)")]
    Empty { path: PathBuf },
    /// A read-only disk with an overlay makes no sense.
    #[error("disk image {path}: an overlay disk cannot also be read-only")]
    ReadOnlyOverlay { path: PathBuf },
    /// The overlay could not be opened or created.
    #[error("cannot use the overlay over {path}")]
    Overlay {
        path: PathBuf,
        #[source]
        source: OverlayError,
    },
    /// The overlay could not be recreated from a snapshot's disk layers.
    #[error("cannot restore the overlay over {path} from the snapshot")]
    Restore {
        path: PathBuf,
        #[source]
        source: LayerError,
    },
    /// A snapshot of a disk with state (a writable raw image) cannot be restored.
    #[error(
        "disk image {path}: the snapshot has disk layers but no overlay path was given for them"
    )]
    NoOverlayForLayers { path: PathBuf },
    /// The activate eventfd could not be created.
    #[error("cannot create the activate eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The backing storage and what the guest may do with it.
#[derive(Debug)]
pub struct Disk {
    backend: Backend,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
}

impl Disk {
    /// Where the sectors live.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
    /// Where the sectors live, mutably (writes and flushes).
    pub fn backend_mut(&mut self) -> &mut Backend {
        &mut self.backend
    }
    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// Whole sectors of the image, in bytes; a trailing partial sector is not exposed.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors * SECTOR_SIZE
    }
    /// The GET_ID answer.
    pub fn id(&self) -> &[u8; ID_LEN] {
        &self.id
    }
}

/// virtio-blk on an image file.
#[derive(Debug)]
pub struct Block {
    pub(super) config: BlockConfig,
    pub(super) disk: Disk,
    /// Bounce buffer between the image and guest memory (one request at a time).
    pub(super) bounce: Vec<u8>,
    pub(super) acked_features: u64,
    pub(super) lifecycle: DeviceLifecycle,
    /// The disk snapshot layers the overlay's current contents descend from (oldest first);
    /// empty until the first snapshot or when not restored from one.
    pub(super) chain: Vec<DiskLayer>,
}

/// The base (or raw) image, opened, with its size.
struct Image {
    file: File,
    meta: std::fs::Metadata,
    size: u64,
}

impl Image {
    fn open(path: &Path, writable: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Metadata {
            path: path.to_owned(),
            source,
        })?;
        // Seeking to the end sizes regular files and block devices alike (a block device's
        // metadata length is 0). Positioned I/O later ignores the file offset.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Metadata {
                path: path.to_owned(),
                source,
            })?;
        if size < SECTOR_SIZE {
            return Err(BlockError::Empty {
                path: path.to_owned(),
            });
        }
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %path.display(),
                "disk image size is not a multiple of 512 bytes; the last partial sector is hidden"
            );
        }
        Ok(Self { file, meta, size })
    }
}

impl Block {
    /// Opens the image (read-only when `config.read_only` or when it is an overlay's base) and
    /// the overlay, if configured.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        Self::build(config, None)
    }

    /// Like [`Block::new`], but recreates the overlay (which must not exist yet) from a
    /// snapshot's disk layers first. A manifest without layers (a read-only disk) restores as
    /// a plain [`Block::new`].
    pub fn restore_disk(config: BlockConfig, manifest: &DiskManifest) -> Result<Self, BlockError> {
        if manifest.layers.is_empty() {
            return Self::new(config);
        }
        if config.overlay.is_none() {
            return Err(BlockError::NoOverlayForLayers { path: config.path });
        }
        Self::build(config, Some(manifest))
    }

    fn build(config: BlockConfig, restore: Option<&DiskManifest>) -> Result<Self, BlockError> {
        if config.overlay.is_some() && config.read_only {
            return Err(BlockError::ReadOnlyOverlay { path: config.path });
        }
        let writable_image = !config.read_only && config.overlay.is_none();
        let image = Image::open(&config.path, writable_image)?;
        let id = disk_id(&image.meta);
        let capacity_sectors = image.size / SECTOR_SIZE;
        let mut chain = Vec::new();
        let backend = match (&config.overlay, restore) {
            (None, _) => Backend::Raw(image.file),
            (Some(path), None) => Backend::Overlay(
                Overlay::open(image.file, image.size, path).map_err(|source| {
                    BlockError::Overlay {
                        path: config.path.clone(),
                        source,
                    }
                })?,
            ),
            (Some(path), Some(manifest)) => {
                let overlay =
                    layer::restore(image.file, image.size, manifest, path).map_err(|source| {
                        BlockError::Restore {
                            path: config.path.clone(),
                            source,
                        }
                    })?;
                chain.clone_from(&manifest.layers);
                Backend::Overlay(overlay)
            }
        };
        let disk = Disk {
            backend,
            read_only: config.read_only,
            capacity_sectors,
            id,
        };
        Ok(Self {
            config,
            disk,
            bounce: vec![0u8; request::CHUNK],
            acked_features: 0,
            lifecycle: DeviceLifecycle::new().map_err(BlockError::EventFd)?,
            chain,
        })
    }

    /// Capacity in 512-byte sectors, as the guest sees it.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    /// Serves every available request; signals the guest if any were completed.
    pub(super) fn process_queue(&mut self) {
        let Some(Activation {
            mem,
            queues,
            interrupt,
            ..
        }) = self.lifecycle.active_mut()
        else {
            return;
        };
        let (disk, bounce) = (&mut self.disk, &mut self.bounce);
        drain_queue(&mut queues[0], mem, interrupt, |chain| {
            request::execute(disk, bounce, mem, chain)
        });
    }
}

/// A stable id for the image: its device and inode numbers, like Firecracker's.
fn disk_id(meta: &std::fs::Metadata) -> [u8; ID_LEN] {
    let text = format!("{}{}{}", meta.dev(), meta.rdev(), meta.ino());
    let mut id = [0u8; ID_LEN];
    let n = text.len().min(ID_LEN);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut features = FEATURE_VERSION_1 | FEATURE_EVENT_IDX | (1 << VIRTIO_BLK_F_FLUSH);
        if self.disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `le64 capacity`; the rest is unused here.
        read_config_bytes(&self.disk.capacity_sectors.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        guest_warn!("virtio-blk: write to the read-only configuration space");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.lifecycle.activate(activation, 1)
    }

    fn is_activated(&self) -> bool {
        self.lifecycle.is_active()
    }

    fn reset(&mut self) {
        self.lifecycle.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use virtio_bindings::virtio_blk::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::test_utils::{GuestQueue, activation, guest_memory, ro, wo};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    /// An image of `sectors` sectors where byte i of sector s is `s as u8 ^ i as u8`.
    fn image(sectors: u64) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for s in 0..sectors {
            let sector: Vec<u8> = (0..SECTOR_SIZE).map(|i| ((s ^ i) & 0xff) as u8).collect();
            file.write_all(&sector).unwrap();
        }
        file.flush().unwrap();
        file
    }

    fn block(path: &std::path::Path, read_only: bool) -> Block {
        Block::new(BlockConfig {
            path: path.to_owned(),
            read_only,
            overlay: None,
        })
        .unwrap()
    }

    fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&request_type.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    /// Runs one request through an activated device; returns the used length.
    fn run(
        blk: &mut Block,
        mem: &GuestMemoryMmap,
        chain: &[crate::devices::virtio::test_utils::Buf],
    ) -> u32 {
        let mut guest = GuestQueue::new(mem, 0, 16);
        guest.add_chain(chain);
        let (act, _irq) = activation(mem, vec![guest.queue()]);
        blk.activate(act).unwrap();
        blk.process_queue();
        blk.reset();
        assert_eq!(guest.used_count(), 1);
        guest.used(0).1
    }

    #[test]
    fn config_reports_capacity_and_features() {
        let img = image(8);
        let blk = block(img.path(), false);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_eq!(blk.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(blk.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(blk.avail_features() & FEATURE_VERSION_1, 0);
        let ro_blk = block(img.path(), true);
        assert_ne!(ro_blk.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn reads_sectors_into_guest_memory() {
        let img = image(8);
        let mut blk = block(img.path(), false);
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 3);
        let used = run(
            &mut blk,
            &mem,
            &[ro(HDR, 16), wo(DATA, 1024), wo(STATUS, 1)],
        );
        assert_eq!(used, 1025);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let mut data = vec![0u8; 1024];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        let expected: Vec<u8> = (0..1024u64)
            .map(|i| (((3 + i / 512) ^ (i % 512)) & 0xff) as u8)
            .collect();
        assert_eq!(data, expected);
    }

    #[test]
    fn writes_reach_the_image_and_flush_succeeds() {
        let img = image(8);
        let mut blk = block(img.path(), false);
        let mem = guest_memory();
        mem.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 7);
        let used = run(&mut blk, &mem, &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
        assert_eq!(used, 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let contents = std::fs::read(img.path()).unwrap();
        assert_eq!(contents[7 * 512..], [0xabu8; 512]);
        assert_eq!(contents[6 * 512], 6, "neighbouring sector untouched");

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        run(&mut blk, &mem, &[ro(HDR, 16), wo(STATUS, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn overlay_disk_takes_guest_writes_and_keeps_the_base() {
        let img = image(16);
        let before = std::fs::read(img.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = BlockConfig {
            path: img.path().to_owned(),
            read_only: false,
            overlay: Some(dir.path().join("disk.cow")),
        };
        let mut blk = Block::new(cfg.clone()).unwrap();
        assert_eq!(blk.capacity_sectors(), 16);
        assert_eq!(blk.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mem = guest_memory();
        mem.write_slice(&[0xcdu8; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 9);
        run(&mut blk, &mem, &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        run(&mut blk, &mem, &[ro(HDR, 16), wo(STATUS, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        drop(blk);
        assert_eq!(std::fs::read(img.path()).unwrap(), before, "base untouched");

        // Reopened: the write is there, its neighbours still come from the base.
        let mut blk = Block::new(cfg).unwrap();
        header(&mem, VIRTIO_BLK_T_IN, 8);
        run(
            &mut blk,
            &mem,
            &[ro(HDR, 16), wo(DATA, 1536), wo(STATUS, 1)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let mut data = vec![0u8; 1536];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data[..512], before[8 * 512..9 * 512]);
        assert_eq!(data[512..1024], [0xcdu8; 512]);
        assert_eq!(data[1024..], before[10 * 512..11 * 512]);
    }

    #[test]
    fn overlay_disks_cannot_be_read_only() {
        let img = image(1);
        let dir = tempfile::tempdir().unwrap();
        let err = Block::new(BlockConfig {
            path: img.path().to_owned(),
            read_only: true,
            overlay: Some(dir.path().join("x.cow")),
        })
        .unwrap_err();
        assert!(matches!(err, BlockError::ReadOnlyOverlay { .. }), "{err}");
    }

    #[test]
    fn read_only_disk_refuses_writes_with_ioerr() {
        let img = image(8);
        let before = std::fs::read(img.path()).unwrap();
        let mut blk = block(img.path(), true);
        let mem = guest_memory();
        mem.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        run(&mut blk, &mem, &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(std::fs::read(img.path()).unwrap(), before);
    }

    #[test]
    fn out_of_range_and_misaligned_transfers_fail() {
        let img = image(8);
        let mut blk = block(img.path(), false);
        let mem = guest_memory();
        // Last sector + one more.
        header(&mem, VIRTIO_BLK_T_IN, 7);
        run(
            &mut blk,
            &mem,
            &[ro(HDR, 16), wo(DATA, 1024), wo(STATUS, 1)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // A sector number whose byte offset overflows u64.
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX / 2);
        run(&mut blk, &mem, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // Not a whole sector.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        run(&mut blk, &mem, &[ro(HDR, 16), wo(DATA, 100), wo(STATUS, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // Exactly the last sector is fine.
        header(&mem, VIRTIO_BLK_T_IN, 7);
        run(&mut blk, &mem, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn get_id_and_unsupported_requests() {
        let img = image(1);
        let mut blk = block(img.path(), false);
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let used = run(&mut blk, &mem, &[ro(HDR, 16), wo(DATA, 20), wo(STATUS, 1)]);
        assert_eq!(used, 21);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, blk.disk.id());
        assert!(id[0].is_ascii_digit());

        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        run(&mut blk, &mem, &[ro(HDR, 16), wo(STATUS, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn malformed_chains_do_not_panic() {
        let img = image(1);
        let mut blk = block(img.path(), false);
        let mem = guest_memory();
        // No writable status byte.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&mut blk, &mem, &[ro(HDR, 16)]), 0);
        // Header shorter than 16 bytes.
        assert_eq!(run(&mut blk, &mem, &[ro(HDR, 4), wo(STATUS, 1)]), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // A buffer outside guest memory.
        assert_eq!(
            run(
                &mut blk,
                &mem,
                &[ro(HDR, 16), wo(0x4000_0000, 512), wo(STATUS, 1)]
            ),
            0
        );
    }

    #[test]
    fn missing_or_empty_images_are_refused() {
        let err = Block::new(BlockConfig {
            path: "/nonexistent/disk.img".into(),
            read_only: true,
            overlay: None,
        })
        .unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }), "{err}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = Block::new(BlockConfig {
            path: empty.path().to_owned(),
            read_only: false,
            overlay: None,
        })
        .unwrap_err();
        assert!(matches!(err, BlockError::Empty { .. }), "{err}");
    }
}
