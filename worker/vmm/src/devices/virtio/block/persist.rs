//! Snapshot state of the block device: features, queue positions and the backing image
//! configuration, plus [`Block::snapshot_disk`], which saves the overlay's contents as a disk
//! layer (the image contents of a raw disk are the image file itself).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::device::{Block, BlockConfig, BlockError};
use super::layer::{self, DiskManifest, LayerError, LayerKind};
use super::overlay::CLUSTER_SIZE;
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::persist::VirtioDeviceState;

/// File name of the disk layer in a snapshot directory.
pub const LAYER_FILE: &str = "disk0.layer";
/// Where a merged layer is written before it replaces [`LAYER_FILE`].
const MERGING_FILE: &str = "disk0.layer.merging";

/// Everything needed to recreate a [`Block`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Feature negotiation and queues.
    pub virtio: VirtioDeviceState,
    /// The image path (the base image when `overlay` is set).
    pub path: PathBuf,
    /// Whether the disk is read-only.
    pub read_only: bool,
    /// Capacity the guest saw, in 512-byte sectors (a restore must find the same size).
    pub capacity_sectors: u64,
    /// The overlay file the disk used when saved (informational: a restore gets a new one and
    /// recreates its contents from the [`DiskManifest`]).
    #[serde(default)]
    pub overlay: Option<PathBuf>,
    /// The layers that recreate an overlay disk's contents, when the state was saved with
    /// [`Block::snapshot_disk`] (absent in states saved without disk layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskManifest>,
}

/// Why a disk snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotDiskError {
    #[error(
        "disk {0} is a writable raw image: only overlay disks (or read-only disks) can be snapshotted"
    )]
    WritableRaw(PathBuf),
    #[error("cannot flush the overlay {path} before the snapshot")]
    Flush {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the disk layer")]
    Layer(#[from] LayerError),
    #[error("only one disk per VM can be snapshotted (one disk layer file per snapshot)")]
    TooManyDisks,
}

/// Why a saved disk could not be reopened.
#[derive(Debug, thiserror::Error)]
pub enum ReopenError {
    #[error(
        "disk {path} was saved with the overlay {saved}: give a new overlay file for the \
         restored disk (--rootfs-overlay PATH)"
    )]
    NeedsOverlay { path: PathBuf, saved: PathBuf },
    #[error("disk {path} used the overlay {saved} but the snapshot holds no disk layers")]
    NoLayers { path: PathBuf, saved: PathBuf },
    #[error(transparent)]
    Block(#[from] BlockError),
}

impl Block {
    /// The disk of a saved [`BlockState`]: a read-only or raw disk reopened; an overlay disk
    /// recreated in the new overlay file `new_overlay` from the saved layers (relative ones
    /// are in `snapshot_dir`), over the same base image (never opened writable). `new_overlay`
    /// is ignored for a disk without overlay.
    pub fn reopen(
        state: &BlockState,
        snapshot_dir: &Path,
        new_overlay: Option<&Path>,
    ) -> Result<Self, ReopenError> {
        let Some(saved) = &state.overlay else {
            return Ok(Self::new(BlockConfig {
                path: state.path.clone(),
                read_only: state.read_only,
                overlay: None,
            })?);
        };
        let Some(new_overlay) = new_overlay else {
            return Err(ReopenError::NeedsOverlay {
                path: state.path.clone(),
                saved: saved.clone(),
            });
        };
        let Some(manifest) = &state.disk else {
            return Err(ReopenError::NoLayers {
                path: state.path.clone(),
                saved: saved.clone(),
            });
        };
        let mut manifest = manifest.clone();
        for layer in &mut manifest.layers {
            if layer.path.is_relative() {
                layer.path = snapshot_dir.join(&layer.path);
            }
        }
        let config = BlockConfig {
            path: state.path.clone(),
            read_only: false,
            overlay: Some(new_overlay.to_owned()),
        };
        Ok(Self::restore_disk(config, &manifest)?)
    }

    /// The device's snapshot state.
    pub fn state(&self) -> BlockState {
        BlockState {
            virtio: VirtioDeviceState {
                device_type: self.device_type(),
                avail_features: self.avail_features(),
                acked_features: self.acked_features,
                activated: self.lifecycle.is_active(),
                queues: self.lifecycle.queue_snapshots(),
            },
            path: self.config.path.clone(),
            read_only: self.config.read_only,
            capacity_sectors: self.capacity_sectors(),
            overlay: self.config.overlay.clone(),
            disk: None,
        }
    }

    /// [`Block::state`] with the disk saved into `dir` by [`Block::snapshot_disk`] (overlay
    /// disks only; a read-only raw disk has nothing to save). Layers inside `dir` are recorded
    /// relative to it, so the snapshot directory may be moved (a template is built in a
    /// staging directory, then renamed into the cache); older layers keep their absolute paths.
    pub fn state_with_disk(
        &mut self,
        dir: &Path,
        kind: LayerKind,
        max_depth: usize,
    ) -> Result<BlockState, SnapshotDiskError> {
        let mut disk = self.snapshot_disk(dir, kind, max_depth)?;
        for layer in &mut disk.layers {
            if let Ok(inside) = layer.path.strip_prefix(dir) {
                layer.path = inside.to_owned();
            }
        }
        let mut state = self.state();
        state.disk = (!disk.layers.is_empty()).then_some(disk);
        Ok(state)
    }

    /// Saves the disk into snapshot directory `dir` (absolute) as `disk0.layer` and returns the
    /// chain that recreates it. Call while the guest is paused. A diff layer holds the
    /// clusters written since the previous snapshot of this disk (or the snapshot it was
    /// restored from); without such a parent a diff is taken as full. A full layer holds every
    /// cluster the overlay holds. A read-only raw disk has no state: no file, no layers.
    ///
    /// A chain longer than `max_depth` (at least 1) is merged right away into one full layer
    /// that replaces the new file, as memory chains are: a restore then reads a bounded number
    /// of files, and the snapshot no longer needs its parents' directories.
    pub fn snapshot_disk(
        &mut self,
        dir: &Path,
        kind: LayerKind,
        max_depth: usize,
    ) -> Result<DiskManifest, SnapshotDiskError> {
        let Some(overlay) = self.disk.backend_mut().overlay_mut() else {
            if self.config.read_only {
                return Ok(DiskManifest {
                    virtual_size: self.disk.capacity_bytes(),
                    cluster_size: CLUSTER_SIZE,
                    layers: Vec::new(),
                });
            }
            return Err(SnapshotDiskError::WritableRaw(self.config.path.clone()));
        };
        overlay.flush().map_err(|source| SnapshotDiskError::Flush {
            path: overlay.path().to_owned(),
            source,
        })?;
        let kind = if self.chain.is_empty() {
            LayerKind::Full
        } else {
            kind
        };
        let clusters: Vec<u64> = match kind {
            LayerKind::Full => overlay.allocated().ones(),
            LayerKind::Diff => overlay.dirty().ones(),
        }
        .map(|c| c as u64)
        .collect();
        let layer = layer::save(overlay, &dir.join(LAYER_FILE), kind, &clusters)?;
        overlay.clear_dirty();
        if kind == LayerKind::Full {
            self.chain.clear();
        }
        self.chain.push(layer);
        let manifest = DiskManifest {
            virtual_size: overlay.geometry().virtual_size,
            cluster_size: CLUSTER_SIZE,
            layers: self.chain.clone(),
        };
        if manifest.layers.len() <= max_depth.max(1) {
            return Ok(manifest);
        }
        let merged = merge_in_place(&manifest, dir)?;
        self.chain.clone_from(&merged.layers);
        Ok(merged)
    }
}

/// Merges `manifest`'s chain, whose newest layer is `dir`'s [`LAYER_FILE`], into one full layer
/// that then takes that file's place. Until the rename the chain on disk is the unmerged one,
/// which is just as complete; a failed merge leaves it (and no partial file) behind.
fn merge_in_place(manifest: &DiskManifest, dir: &Path) -> Result<DiskManifest, LayerError> {
    let merging = dir.join(MERGING_FILE);
    let target = dir.join(LAYER_FILE);
    let merged = layer::merge(manifest, &merging).and_then(|mut merged| {
        std::fs::rename(&merging, &target).map_err(|source| LayerError::Io {
            what: "rename",
            path: merging.clone(),
            source,
        })?;
        for layer in &mut merged.layers {
            layer.path.clone_from(&target);
        }
        Ok(merged)
    });
    if merged.is_err() {
        let _ = std::fs::remove_file(&merging);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::BlockConfig;
    use crate::devices::virtio::block::overlay::Overlay;

    /// The chain depth the VMM uses (memory chains merge at the same depth).
    const DEPTH: usize = roost_pager::DEFAULT_MAX_DEPTH;

    fn write(blk: &mut Block, offset: u64, data: &[u8]) {
        blk.disk.backend_mut().write_at(data, offset).unwrap();
    }

    fn read_all(blk: &Block) -> Vec<u8> {
        let mut buf = vec![0u8; usize::try_from(blk.disk.capacity_bytes()).unwrap()];
        blk.disk.backend().read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn snapshots_save_full_then_diffs_and_restore_into_a_new_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![7u8; 128 * 1024]).unwrap();
        let config = |overlay: &str| BlockConfig {
            path: base.clone(),
            read_only: false,
            overlay: Some(dir.path().join(overlay)),
        };
        let mut blk = Block::new(config("live.cow")).unwrap();
        assert_eq!(blk.state().overlay, Some(dir.path().join("live.cow")));
        write(&mut blk, 0, &[1; 4096]);

        let (s1, s2) = (dir.path().join("s1"), dir.path().join("s2"));
        std::fs::create_dir_all(&s1).unwrap();
        std::fs::create_dir_all(&s2).unwrap();
        // No parent yet: a diff request is taken as full.
        let m1 = blk.snapshot_disk(&s1, LayerKind::Diff, DEPTH).unwrap();
        assert_eq!(m1.layers.len(), 1);
        assert_eq!(m1.layers[0].kind, LayerKind::Full);
        write(&mut blk, 8192, &[2; 512]);
        let m2 = blk.snapshot_disk(&s2, LayerKind::Diff, DEPTH).unwrap();
        assert_eq!(m2.layers.len(), 2);
        assert_eq!(
            (m2.layers[1].kind, m2.layers[1].clusters),
            (LayerKind::Diff, 1)
        );
        assert!(s2.join(LAYER_FILE).is_file());

        let restored = Block::restore_disk(config("clone.cow"), &m2).unwrap();
        assert_eq!(read_all(&restored), read_all(&blk));
        // The base never changed, and the clone's overlay is its own.
        assert_eq!(std::fs::read(&base).unwrap(), vec![7u8; 128 * 1024]);
        let err = Block::restore_disk(config("clone.cow"), &m2).unwrap_err();
        assert!(
            err.to_string().contains("cannot restore the overlay"),
            "{err}"
        );
        // The restored disk continues the chain: its next diff holds only new writes.
        let mut restored = restored;
        write(&mut restored, 0, &[3; 512]);
        let s3 = dir.path().join("s3");
        std::fs::create_dir_all(&s3).unwrap();
        let m3 = restored.snapshot_disk(&s3, LayerKind::Diff, DEPTH).unwrap();
        assert_eq!(m3.layers.len(), 3);
        assert_eq!(m3.layers[2].clusters, 1);
        let merged = layer::merge(&m3, &dir.path().join("merged.layer")).unwrap();
        let base_file = std::fs::File::open(&base).unwrap();
        let ov = layer::restore(base_file, 128 * 1024, &merged, &dir.path().join("m.cow")).unwrap();
        let mut buf = vec![0u8; 128 * 1024];
        Overlay::read_at(&ov, &mut buf, 0).unwrap();
        assert_eq!(buf, read_all(&restored));
    }

    #[test]
    fn a_saved_overlay_disk_reopens_from_its_layers_into_a_new_overlay_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![5u8; 256 * 1024]).unwrap();
        let mut blk = Block::new(BlockConfig {
            path: base.clone(),
            read_only: false,
            overlay: Some(dir.path().join("live.cow")),
        })
        .unwrap();
        write(&mut blk, 4096, &[9; 8192]);
        let snap = dir.path().join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let state = blk.state_with_disk(&snap, LayerKind::Full, DEPTH).unwrap();
        let layers = &state.disk.as_ref().unwrap().layers;
        assert_eq!(layers.len(), 1);
        assert_eq!(
            layers[0].path,
            Path::new(LAYER_FILE),
            "relative to the snapshot"
        );

        // The snapshot directory moved (as a template into the cache): still found.
        let moved = dir.path().join("moved");
        std::fs::rename(&snap, &moved).unwrap();
        let reopened = Block::reopen(&state, &moved, Some(&dir.path().join("clone.cow"))).unwrap();
        assert_eq!(read_all(&reopened), read_all(&blk));
        assert_eq!(reopened.state().overlay, Some(dir.path().join("clone.cow")));

        let err = Block::reopen(&state, &moved, None).unwrap_err();
        assert!(err.to_string().contains("--rootfs-overlay"), "{err}");
        let without_layers = BlockState {
            disk: None,
            ..state.clone()
        };
        let err =
            Block::reopen(&without_layers, &moved, Some(&dir.path().join("x.cow"))).unwrap_err();
        assert!(matches!(err, ReopenError::NoLayers { .. }), "{err}");
        assert_eq!(std::fs::read(&base).unwrap(), vec![5u8; 256 * 1024]);

        // A read-only disk has no layers and ignores a new overlay.
        let mut ro = Block::new(BlockConfig {
            path: base.clone(),
            read_only: true,
            overlay: None,
        })
        .unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        let state = ro.state_with_disk(&snap, LayerKind::Full, DEPTH).unwrap();
        assert_eq!(state.disk, None);
        let reopened = Block::reopen(&state, &snap, Some(&dir.path().join("y.cow"))).unwrap();
        assert_eq!(reopened.state().overlay, None);
        assert!(!dir.path().join("y.cow").exists());
    }

    #[test]
    fn raw_disks_snapshot_only_when_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 8192]).unwrap();
        let mut ro = Block::new(BlockConfig {
            path: base.clone(),
            read_only: true,
            overlay: None,
        })
        .unwrap();
        let m = ro
            .snapshot_disk(dir.path(), LayerKind::Full, DEPTH)
            .unwrap();
        assert!(m.layers.is_empty());
        assert!(!dir.path().join(LAYER_FILE).exists());
        let mut rw = Block::new(BlockConfig {
            path: base,
            read_only: false,
            overlay: None,
        })
        .unwrap();
        let err = rw
            .snapshot_disk(dir.path(), LayerKind::Full, DEPTH)
            .unwrap_err();
        assert!(matches!(err, SnapshotDiskError::WritableRaw(_)), "{err}");
    }

    #[test]
    fn chains_deeper_than_the_limit_merge_into_the_newest_snapshot_which_then_stands_alone() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![7u8; 256 * 1024]).unwrap();
        let config = |overlay: &str| BlockConfig {
            path: base.clone(),
            read_only: false,
            overlay: Some(dir.path().join(overlay)),
        };
        let mut blk = Block::new(config("live.cow")).unwrap();
        let mut snapshots = Vec::new();
        let mut depths = Vec::new();
        for n in 0..7u8 {
            // Each generation rewrites the first cluster and adds one of its own.
            write(&mut blk, 0, &[n + 1; 512]);
            write(
                &mut blk,
                (u64::from(n) + 1) * CLUSTER_SIZE,
                &[n + 100; 4096],
            );
            let snap = dir.path().join(format!("g{n}"));
            std::fs::create_dir_all(&snap).unwrap();
            let manifest = blk.snapshot_disk(&snap, LayerKind::Diff, 3).unwrap();
            depths.push(manifest.layers.len());
            snapshots.push((snap, manifest));
        }
        // Full, +diff, +diff, then the 4th layer merges into one; and so on.
        assert_eq!(depths, [1, 2, 3, 1, 2, 3, 1]);
        let (newest_dir, newest) = snapshots.last().unwrap();
        assert_eq!(newest.layers[0].kind, LayerKind::Full);
        assert_eq!(newest.layers[0].path, newest_dir.join(LAYER_FILE));
        assert_eq!(newest.layers[0].clusters, 8, "every cluster ever written");
        assert!(!newest_dir.join(MERGING_FILE).exists());

        // The merged snapshot needs no parent: remove every older generation first.
        for (old, _) in &snapshots[..snapshots.len() - 1] {
            std::fs::remove_dir_all(old).unwrap();
        }
        let restored = Block::restore_disk(config("clone.cow"), newest).unwrap();
        assert_eq!(read_all(&restored), read_all(&blk));
        // The base is untouched.
        assert_eq!(std::fs::read(&base).unwrap(), vec![7u8; 256 * 1024]);

        // A restored disk continues from the merged chain.
        let mut restored = restored;
        write(&mut restored, 0, &[42; 512]);
        let next = dir.path().join("next");
        std::fs::create_dir_all(&next).unwrap();
        let m = restored.snapshot_disk(&next, LayerKind::Diff, 3).unwrap();
        assert_eq!(m.layers.len(), 2);
        assert_eq!(
            (m.layers[1].kind, m.layers[1].clusters),
            (LayerKind::Diff, 1)
        );
    }

    #[test]
    fn a_merge_that_cannot_complete_keeps_the_unmerged_chain_and_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![1u8; 64 * 1024]).unwrap();
        let mut blk = Block::new(BlockConfig {
            path: base,
            read_only: false,
            overlay: Some(dir.path().join("live.cow")),
        })
        .unwrap();
        let (g0, g1) = (dir.path().join("g0"), dir.path().join("g1"));
        std::fs::create_dir_all(&g0).unwrap();
        std::fs::create_dir_all(&g1).unwrap();
        write(&mut blk, 0, &[2; 512]);
        blk.snapshot_disk(&g0, LayerKind::Full, 1).unwrap();
        // The parent's layer is gone: the merge cannot read it.
        std::fs::remove_file(g0.join(LAYER_FILE)).unwrap();
        write(&mut blk, 4096, &[3; 512]);
        let err = blk.snapshot_disk(&g1, LayerKind::Diff, 1).unwrap_err();
        assert!(matches!(err, SnapshotDiskError::Layer(_)), "{err}");
        assert!(g1.join(LAYER_FILE).is_file(), "the diff itself was written");
        assert!(!g1.join(MERGING_FILE).exists());
    }
}
