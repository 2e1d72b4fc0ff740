//! Layer tests: full and diff layers recreate the disk, merges equal their chains, and damaged
//! or substituted files are refused before anything is written.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;

const DISK: usize = 256 * 1024;

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        let bytes: Vec<u8> = (0..DISK)
            .map(|i| ((i / 4096) ^ (i % 253)).to_le_bytes()[0])
            .collect();
        File::create(&base).unwrap().write_all(&bytes).unwrap();
        Self { dir, base }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn overlay(&self, name: &str) -> Overlay {
        Overlay::open(
            File::open(&self.base).unwrap(),
            DISK as u64,
            &self.path(name),
        )
        .unwrap()
    }

    fn restore(&self, manifest: &DiskManifest, name: &str) -> Result<Overlay, LayerError> {
        restore(
            File::open(&self.base).unwrap(),
            DISK as u64,
            manifest,
            &self.path(name),
        )
    }
}

fn contents(ov: &Overlay) -> Vec<u8> {
    let mut buf = vec![0u8; DISK];
    ov.read_at(&mut buf, 0).unwrap();
    buf
}

/// Saves like `Block::snapshot_disk`: full = allocated, diff = dirty; clears dirty.
fn snap(ov: &mut Overlay, path: &Path, kind: LayerKind) -> DiskLayer {
    let clusters: Vec<u64> = match kind {
        LayerKind::Full => ov.allocated().ones(),
        LayerKind::Diff => ov.dirty().ones(),
    }
    .map(|c| c as u64)
    .collect();
    let layer = save(ov, path, kind, &clusters).unwrap();
    ov.clear_dirty();
    layer
}

fn manifest(layers: Vec<DiskLayer>) -> DiskManifest {
    DiskManifest {
        virtual_size: DISK as u64,
        cluster_size: CLUSTER_SIZE,
        layers,
    }
}

/// A chain of a full layer and two diffs, with the overlay's contents after each.
fn chain(fx: &Fixture) -> (Vec<DiskLayer>, Vec<Vec<u8>>) {
    let mut ov = fx.overlay("live.cow");
    ov.write_at(&[1; 8192], 0).unwrap();
    ov.write_at(&[2; 512], 40 * 1024 + 512).unwrap();
    let full = snap(&mut ov, &fx.path("l0"), LayerKind::Full);
    let after0 = contents(&ov);
    ov.write_at(&[3; 4096], 4096).unwrap(); // overwrites part of layer 0
    ov.write_at(&[4; 4096], 100 * 1024).unwrap();
    let diff1 = snap(&mut ov, &fx.path("l1"), LayerKind::Diff);
    let after1 = contents(&ov);
    ov.write_at(&[5; 1024], 200 * 1024).unwrap();
    let diff2 = snap(&mut ov, &fx.path("l2"), LayerKind::Diff);
    let after2 = contents(&ov);
    assert_eq!((full.clusters, diff1.clusters, diff2.clusters), (3, 2, 1));
    (vec![full, diff1, diff2], vec![after0, after1, after2])
}

#[test]
fn a_chain_restores_each_generation_exactly() {
    let fx = Fixture::new();
    let (layers, states) = chain(&fx);
    for n in 1..=3 {
        let ov = fx
            .restore(&manifest(layers[..n].to_vec()), &format!("r{n}.cow"))
            .unwrap();
        assert_eq!(contents(&ov), states[n - 1], "generation {n}");
        assert_eq!(ov.dirty().count_ones(..), 0);
        // Reopening the restored overlay gives the same disk (the map was made durable).
        drop(ov);
        assert_eq!(contents(&fx.overlay(&format!("r{n}.cow"))), states[n - 1]);
    }
    assert!(!fx.path("r3.cow.partial").exists());
}

#[test]
fn a_merged_chain_equals_the_chain() {
    let fx = Fixture::new();
    let (layers, states) = chain(&fx);
    let merged = merge(&manifest(layers), &fx.path("merged")).unwrap();
    assert_eq!(merged.layers.len(), 1);
    assert_eq!(merged.layers[0].kind, LayerKind::Full);
    assert_eq!(merged.layers[0].clusters, 5, "clusters 0, 1, 10, 25, 50");
    let ov = fx.restore(&merged, "m.cow").unwrap();
    assert_eq!(contents(&ov), states[2]);
}

#[test]
fn damaged_or_substituted_layers_are_refused_and_leave_nothing() {
    let fx = Fixture::new();
    let (layers, _) = chain(&fx);
    let pristine = std::fs::read(&layers[1].path).unwrap();

    let mut flipped = pristine.clone();
    let last_data = flipped.len() - 40;
    flipped[last_data] ^= 1;
    std::fs::write(&layers[1].path, &flipped).unwrap();
    let err = fx.restore(&manifest(layers.clone()), "x.cow").unwrap_err();
    assert!(matches!(err, LayerError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("corrupted"), "{err}");

    std::fs::write(&layers[1].path, &pristine[..pristine.len() - 1]).unwrap();
    let err = fx.restore(&manifest(layers.clone()), "x.cow").unwrap_err();
    assert!(matches!(err, LayerError::Length { .. }), "{err}");

    let mut bad = pristine.clone();
    bad[0] = b'X';
    std::fs::write(&layers[1].path, &bad).unwrap();
    let err = fx.restore(&manifest(layers.clone()), "x.cow").unwrap_err();
    assert!(matches!(err, LayerError::BadMagic { .. }), "{err}");

    // A valid layer file, but not the one the manifest recorded.
    std::fs::copy(&layers[2].path, &layers[1].path).unwrap();
    let err = fx.restore(&manifest(layers.clone()), "x.cow").unwrap_err();
    assert!(matches!(err, LayerError::NotRecorded { .. }), "{err}");

    std::fs::write(&layers[1].path, &pristine).unwrap();
    let err = fx
        .restore(&manifest(layers[1..].to_vec()), "x.cow")
        .unwrap_err();
    assert!(
        matches!(err, LayerError::Chain),
        "a chain must start full: {err}"
    );
    assert!(!fx.path("x.cow").exists() && !fx.path("x.cow.partial").exists());

    // The right files restore again; an existing overlay is never overwritten.
    fx.restore(&manifest(layers.clone()), "x.cow").unwrap();
    let err = fx.restore(&manifest(layers), "x.cow").unwrap_err();
    assert!(matches!(err, LayerError::OverlayExists(_)), "{err}");
}

#[test]
fn a_chain_for_another_base_size_is_refused() {
    let fx = Fixture::new();
    let (layers, _) = chain(&fx);
    let mut m = manifest(layers);
    m.virtual_size += 4096;
    let err = fx.restore(&m, "y.cow").unwrap_err();
    assert!(matches!(err, LayerError::BaseSize { .. }), "{err}");
}
