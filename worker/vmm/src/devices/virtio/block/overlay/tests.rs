//! Overlay unit tests: read-through, write-allocate, partial writes, durability across reopen,
//! refusal of damaged files, and dirty tracking.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::*;

/// A base image where byte i is `(i / 512) ^ (i % 251)`, so every sector differs.
fn base_bytes(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) ^ (i % 251)).to_le_bytes()[0])
        .collect()
}

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    bytes: Vec<u8>,
}

impl Fixture {
    fn new(len: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        let bytes = base_bytes(len);
        File::create(&base).unwrap().write_all(&bytes).unwrap();
        Self { dir, base, bytes }
    }

    fn overlay_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn open(&self, overlay: &Path) -> Result<Overlay, OverlayError> {
        let base = File::open(&self.base).unwrap();
        Overlay::open(base, self.bytes.len() as u64, overlay)
    }

    fn read(&self, ov: &Overlay, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        ov.read_at(&mut buf, offset).unwrap();
        buf
    }
}

#[test]
fn new_overlay_reads_through_to_the_base() {
    let fx = Fixture::new(64 * 1024 + 512);
    let ov = fx.open(&fx.overlay_path("a.cow")).unwrap();
    assert_eq!(fx.read(&ov, 0, fx.bytes.len()), fx.bytes);
    assert_eq!(fx.read(&ov, 4096 + 512, 1024), fx.bytes[4608..5632]);
    assert_eq!(ov.allocated().count_ones(..), 0);
}

#[test]
fn writes_allocate_and_never_touch_the_base() {
    let fx = Fixture::new(64 * 1024);
    let mut ov = fx.open(&fx.overlay_path("a.cow")).unwrap();
    // Two whole clusters (2 and 3).
    ov.write_at(&[0xaa; 8192], 8192).unwrap();
    let mut expected = fx.bytes.clone();
    expected[8192..16384].fill(0xaa);
    assert_eq!(fx.read(&ov, 0, expected.len()), expected);
    let allocated: Vec<usize> = ov.allocated().ones().collect();
    assert_eq!(allocated, vec![2, 3]);
    assert_eq!(std::fs::read(&fx.base).unwrap(), fx.bytes, "base unchanged");
}

#[test]
fn partial_writes_copy_the_rest_of_the_cluster_from_the_base() {
    let fx = Fixture::new(64 * 1024);
    let mut ov = fx.open(&fx.overlay_path("a.cow")).unwrap();
    // One sector in the middle of cluster 1.
    ov.write_at(&[0x11; 512], 4096 + 1024).unwrap();
    // A write spanning the end of cluster 4 and the start of cluster 6 (5 whole).
    ov.write_at(&[0x22; 4096 + 1024 + 512], 5 * 4096 - 1024)
        .unwrap();
    let mut expected = fx.bytes.clone();
    expected[5120..5632].fill(0x11);
    expected[5 * 4096 - 1024..6 * 4096 + 512].fill(0x22);
    assert_eq!(fx.read(&ov, 0, expected.len()), expected);
    let allocated: Vec<usize> = ov.allocated().ones().collect();
    assert_eq!(allocated, vec![1, 4, 5, 6]);
    // The same sector written again in an allocated cluster keeps its neighbours.
    ov.write_at(&[0x33; 512], 4096).unwrap();
    expected[4096..4608].fill(0x33);
    assert_eq!(fx.read(&ov, 4096, 4096), expected[4096..8192]);
}

#[test]
fn a_base_that_is_not_cluster_aligned_reads_and_writes_its_tail() {
    let fx = Fixture::new(3 * 4096 + 1024);
    let mut ov = fx.open(&fx.overlay_path("a.cow")).unwrap();
    ov.write_at(&[0x44; 512], 3 * 4096).unwrap();
    let mut expected = fx.bytes.clone();
    expected[3 * 4096..3 * 4096 + 512].fill(0x44);
    assert_eq!(fx.read(&ov, 0, expected.len()), expected);
}

#[test]
fn flushed_writes_survive_reopen_and_unflushed_map_changes_do_not_corrupt() {
    let fx = Fixture::new(64 * 1024);
    let path = fx.overlay_path("a.cow");
    let mut ov = fx.open(&path).unwrap();
    ov.write_at(&[0x55; 4096], 0).unwrap();
    ov.flush().unwrap();
    ov.write_at(&[0x66; 4096], 4096 * 7).unwrap();
    // Dropped without a flush: the second write's map entry is lost, the first survives.
    drop(ov);
    let mut ov = fx.open(&path).unwrap();
    assert_eq!(fx.read(&ov, 0, 4096), vec![0x55; 4096]);
    assert_eq!(fx.read(&ov, 7 * 4096, 4096), fx.bytes[7 * 4096..8 * 4096]);
    // Many flushes alternate the slots; the newest generation wins.
    for round in 0..5u8 {
        ov.write_at(&[round; 4096], 4096 * u64::from(round + 8))
            .unwrap();
        ov.flush().unwrap();
    }
    drop(ov);
    let ov = fx.open(&path).unwrap();
    for round in 0..5u8 {
        let at = 4096 * u64::from(round + 8);
        assert_eq!(fx.read(&ov, at, 4096), vec![round; 4096]);
    }
    assert_eq!(ov.allocated().count_ones(..), 6);
}

#[test]
fn a_torn_newest_slot_falls_back_to_the_older_one() {
    let fx = Fixture::new(64 * 1024);
    let path = fx.overlay_path("a.cow");
    let mut ov = fx.open(&path).unwrap(); // generation 1 in slot 0 (empty map)
    ov.write_at(&[0x77; 4096], 0).unwrap();
    ov.flush().unwrap(); // generation 2 in slot 1
    let slot1 = ov.geometry().slot_offset(1);
    drop(ov);
    // Tear slot 1's bitmap.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xff; 8], slot1 + format::HEADER_PAGE)
        .unwrap();
    let ov = fx.open(&path).unwrap();
    assert_eq!(ov.allocated().count_ones(..), 0, "slot 0's older map");
    assert_eq!(fx.read(&ov, 0, 4096), fx.bytes[..4096]);
}

#[test]
fn corrupted_or_foreign_overlays_are_refused_with_the_reason() {
    let fx = Fixture::new(64 * 1024);
    let path = fx.overlay_path("a.cow");
    let mut ov = fx.open(&path).unwrap();
    ov.write_at(&[1; 4096], 0).unwrap();
    ov.flush().unwrap();
    drop(ov);
    let pristine = std::fs::read(&path).unwrap();

    // Both slots' bitmaps damaged.
    let mut bytes = pristine.clone();
    let slot_len = Geometry::new(64 * 1024).unwrap().slot_len;
    for slot in [0, slot_len] {
        bytes[usize::try_from(slot + format::HEADER_PAGE).unwrap()] ^= 0x80;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = fx.open(&path).unwrap_err();
    assert!(
        matches!(
            &err,
            OverlayError::Corrupt {
                reason: SlotError::BitmapChecksum,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("unusable"), "{err}");

    // Not an overlay at all.
    std::fs::write(&path, vec![0x42u8; 64 * 1024]).unwrap();
    let err = fx.open(&path).unwrap_err();
    assert!(
        matches!(
            &err,
            OverlayError::Corrupt {
                reason: SlotError::BadMagic,
                ..
            }
        ),
        "{err}"
    );

    // Truncated inside the map.
    std::fs::write(&path, &pristine[..100]).unwrap();
    let err = fx.open(&path).unwrap_err();
    assert!(
        matches!(
            &err,
            OverlayError::Corrupt {
                reason: SlotError::Truncated,
                ..
            }
        ),
        "{err}"
    );

    // Truncated inside the data area: the map says cluster 0 is allocated.
    let data_offset = usize::try_from(Geometry::new(64 * 1024).unwrap().data_offset).unwrap();
    std::fs::write(&path, &pristine[..data_offset + 100]).unwrap();
    let err = fx.open(&path).unwrap_err();
    assert!(
        matches!(&err, OverlayError::Truncated { cluster: 0, .. }),
        "{err}"
    );

    // Made for a different base size.
    std::fs::write(&path, &pristine).unwrap();
    let other = tempfile::NamedTempFile::new().unwrap();
    other.as_file().set_len(128 * 1024).unwrap();
    let err = Overlay::open(File::open(other.path()).unwrap(), 128 * 1024, &path).unwrap_err();
    assert!(err.to_string().contains("65536-byte base image"), "{err}");
}

#[test]
fn dirty_tracking_follows_writes_and_clears() {
    let fx = Fixture::new(64 * 1024);
    let mut ov = fx.open(&fx.overlay_path("a.cow")).unwrap();
    ov.write_at(&[1; 512], 0).unwrap();
    ov.write_at(&[2; 8192], 4096 * 4).unwrap();
    assert_eq!(ov.dirty().ones().collect::<Vec<_>>(), vec![0, 4, 5]);
    ov.clear_dirty();
    assert_eq!(ov.dirty().count_ones(..), 0);
    ov.write_at(&[3; 512], 4096 * 4 + 512).unwrap();
    assert_eq!(ov.dirty().ones().collect::<Vec<_>>(), vec![4]);
    assert_eq!(ov.allocated().count_ones(..), 3);
}

#[test]
fn two_overlays_over_one_base_are_independent() {
    let fx = Fixture::new(64 * 1024);
    let mut a = fx.open(&fx.overlay_path("a.cow")).unwrap();
    let mut b = fx.open(&fx.overlay_path("b.cow")).unwrap();
    a.write_at(&[0xaa; 4096], 0).unwrap();
    b.write_at(&[0xbb; 4096], 4096).unwrap();
    assert_eq!(fx.read(&a, 4096, 4096), fx.bytes[4096..8192]);
    assert_eq!(fx.read(&b, 0, 4096), fx.bytes[..4096]);
}
