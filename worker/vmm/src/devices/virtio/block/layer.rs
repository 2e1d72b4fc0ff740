//! Disk snapshot layers: the clusters an overlay holds (a full layer) or those written since
//! the previous snapshot (a diff layer), in one self-checking file, and the chain of such
//! files that recreates a disk over its base image.
//!
//! Layer file (little-endian):
//!
//! ```text
//! header   64 bytes: magic "ROOSTDSL", version u32, cluster size u32, virtual size u64,
//!          cluster count N u64, zero padding
//! index    N × u64: the cluster numbers, strictly ascending
//! data     N × cluster size: the clusters' contents, in index order
//! trailer  SHA-256 of everything before it
//! ```
//!
//! A chain is a full layer followed by diffs, oldest first; a cluster's content is that of the
//! newest layer holding it, else the base image's. Restoring writes the chain into a fresh
//! overlay; merging writes one full layer equal to the whole chain (so chains stay short, like
//! memory chains). Every file is checked (magic, version, geometry, length, order, checksum and
//! the checksum recorded in the manifest) before any of its data is trusted.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::overlay::{CLUSTER_BYTES, CLUSTER_SIZE, Overlay, OverlayError};

/// Identifies a layer file.
pub const MAGIC: [u8; 8] = *b"ROOSTDSL";
/// The only layer format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Bytes of the layer header.
const HEADER_BYTES: usize = 64;
const HEADER_LEN: u64 = HEADER_BYTES as u64;
/// Bytes of the SHA-256 trailer.
const TRAILER_LEN: u64 = 32;

/// What a layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// Every cluster the overlay held.
    Full,
    /// The clusters written since the previous layer.
    Diff,
}

/// One file of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayer {
    /// Absolute path of the layer file.
    pub path: PathBuf,
    pub kind: LayerKind,
    /// Clusters in the file.
    pub clusters: u64,
    /// Hex SHA-256 of the file's contents before the trailer (the trailer's value).
    pub sha256: String,
}

/// A disk's snapshot: the chain that recreates its overlay over the base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskManifest {
    /// Size of the base image (and of the virtual disk), bytes.
    pub virtual_size: u64,
    pub cluster_size: u64,
    /// Full layer first, then diffs, oldest first. Empty for a read-only disk without overlay.
    pub layers: Vec<DiskLayer>,
}

/// Why a layer could not be written, read, applied or merged.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot {what} disk layer {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a Roost disk layer (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("disk layer {path} has format version {version}; this build reads version {VERSION}")]
    Version { path: PathBuf, version: u32 },
    #[error(
        "disk layer {path} is for a {found_size}-byte disk with {found_cluster}-byte clusters, \
         expected {expected_size} bytes and {CLUSTER_SIZE}-byte clusters"
    )]
    Geometry {
        path: PathBuf,
        found_size: u64,
        found_cluster: u32,
        expected_size: u64,
    },
    #[error("disk layer {path} is {found} bytes long, its header implies {expected} (truncated?)")]
    Length {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("disk layer {path} has an unsorted or out-of-range cluster index")]
    Index { path: PathBuf },
    #[error("disk layer {path} fails its checksum (corrupted)")]
    Checksum { path: PathBuf },
    #[error("disk layer {path} is not the file the snapshot recorded (checksum differs)")]
    NotRecorded { path: PathBuf },
    #[error("the disk snapshot chain is empty or does not start with a full layer")]
    Chain,
    #[error("the snapshot's disk is {manifest} bytes but the base image is {base} bytes")]
    BaseSize { manifest: u64, base: u64 },
    #[error("overlay {0} already exists: a restore creates a new overlay")]
    OverlayExists(PathBuf),
    #[error("cannot create the restored overlay")]
    Overlay(#[from] OverlayError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LayerError + use<> {
    let path = path.to_owned();
    move |source| LayerError::Io { what, path, source }
}

/// A writer that hashes what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn header(virtual_size: u64, count: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&u32::try_from(CLUSTER_SIZE).unwrap_or(0).to_le_bytes());
    h[16..24].copy_from_slice(&virtual_size.to_le_bytes());
    h[24..32].copy_from_slice(&count.to_le_bytes());
    h
}

/// Writes a new layer at `path` (which must not exist) with `clusters` (ascending), their
/// contents coming from `read(cluster, buf)`; syncs it and returns its description.
fn write_layer(
    path: &Path,
    kind: LayerKind,
    virtual_size: u64,
    clusters: &[u64],
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> Result<DiskLayer, LayerError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create", path))?;
    let written = (|| {
        let mut out = Hashing {
            inner: BufWriter::with_capacity(1 << 20, &file),
            hash: Sha256::new(),
        };
        out.write_all(&header(virtual_size, clusters.len() as u64))?;
        for cluster in clusters {
            out.write_all(&cluster.to_le_bytes())?;
        }
        let mut buf = vec![0u8; CLUSTER_BYTES];
        for &cluster in clusters {
            read(cluster, &mut buf)?;
            out.write_all(&buf)?;
        }
        let sum: [u8; 32] = out.hash.clone().finalize().into();
        out.inner.write_all(&sum)?;
        out.inner.flush()?;
        file.sync_all()?;
        Ok::<_, io::Error>(sum)
    })();
    match written {
        Ok(sum) => Ok(DiskLayer {
            path: path.to_owned(),
            kind,
            clusters: clusters.len() as u64,
            sha256: hex_string(&sum),
        }),
        Err(source) => {
            let _ = std::fs::remove_file(path);
            Err(LayerError::Io {
                what: "write",
                path: path.to_owned(),
                source,
            })
        }
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Saves `clusters` of `overlay` (ascending) as a new layer file at `path`.
pub fn save(
    overlay: &Overlay,
    path: &Path,
    kind: LayerKind,
    clusters: &[u64],
) -> Result<DiskLayer, LayerError> {
    let size = overlay.geometry().virtual_size;
    write_layer(path, kind, size, clusters, |c, buf| {
        overlay.read_cluster(c, buf)
    })
}

/// An opened, fully verified layer: its index, ready for reading clusters by position.
struct VerifiedLayer {
    file: File,
    index: Vec<u64>,
}

impl VerifiedLayer {
    /// Opens `layer`, checks header, geometry, length, index order and both checksums (the
    /// file's trailer and the manifest's record), reading the whole file once.
    fn open(layer: &DiskLayer, virtual_size: u64) -> Result<Self, LayerError> {
        let path = layer.path.as_path();
        let file = File::open(path).map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        let mut hash = Sha256::new();
        let mut head = [0u8; HEADER_BYTES];
        reader
            .read_exact(&mut head)
            .map_err(|_| LayerError::Length {
                path: path.to_owned(),
                found: len,
                expected: HEADER_LEN + TRAILER_LEN,
            })?;
        if head[..8] != MAGIC {
            return Err(LayerError::BadMagic {
                path: path.to_owned(),
            });
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version != VERSION {
            return Err(LayerError::Version {
                path: path.to_owned(),
                version,
            });
        }
        let cluster_size = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
        let size = word(16);
        if u64::from(cluster_size) != CLUSTER_SIZE || size != virtual_size {
            return Err(LayerError::Geometry {
                path: path.to_owned(),
                found_size: size,
                found_cluster: cluster_size,
                expected_size: virtual_size,
            });
        }
        let count = word(24);
        let expected = count
            .checked_mul(8 + CLUSTER_SIZE)
            .and_then(|body| body.checked_add(HEADER_LEN + TRAILER_LEN));
        if expected != Some(len) {
            return Err(LayerError::Length {
                path: path.to_owned(),
                found: len,
                expected: expected.unwrap_or(u64::MAX),
            });
        }
        hash.update(head);
        let clusters = virtual_size.div_ceil(CLUSTER_SIZE);
        let mut index = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        let mut word = [0u8; 8];
        for _ in 0..count {
            reader.read_exact(&mut word).map_err(io_err("read", path))?;
            hash.update(word);
            let cluster = u64::from_le_bytes(word);
            if cluster >= clusters || index.last().is_some_and(|&prev| prev >= cluster) {
                return Err(LayerError::Index {
                    path: path.to_owned(),
                });
            }
            index.push(cluster);
        }
        let mut buf = vec![0u8; CLUSTER_BYTES];
        for _ in 0..count {
            reader.read_exact(&mut buf).map_err(io_err("read", path))?;
            hash.update(&buf);
        }
        let mut trailer = [0u8; 32];
        reader
            .read_exact(&mut trailer)
            .map_err(io_err("read", path))?;
        let sum: [u8; 32] = hash.finalize().into();
        if sum != trailer {
            return Err(LayerError::Checksum {
                path: path.to_owned(),
            });
        }
        if hex_string(&sum) != layer.sha256 || count != layer.clusters {
            return Err(LayerError::NotRecorded {
                path: path.to_owned(),
            });
        }
        Ok(Self { file, index })
    }

    /// Reads the cluster at position `pos` of the index.
    fn read(&self, pos: usize, buf: &mut [u8]) -> io::Result<()> {
        let count = self.index.len() as u64;
        let offset = HEADER_LEN + count * 8 + pos as u64 * CLUSTER_SIZE;
        self.file.read_exact_at(buf, offset)
    }
}

/// The verified layers of a chain, and for each cluster the (layer, position) of its newest copy.
type Resolved = (Vec<VerifiedLayer>, BTreeMap<u64, (usize, usize)>);

/// Verifies every layer of `manifest` and returns, for each cluster, which layer (index into
/// the returned list) and position hold its newest content.
fn resolve(manifest: &DiskManifest) -> Result<Resolved, LayerError> {
    if manifest
        .layers
        .first()
        .is_none_or(|l| l.kind != LayerKind::Full)
        || manifest.cluster_size != CLUSTER_SIZE
    {
        return Err(LayerError::Chain);
    }
    let layers = manifest
        .layers
        .iter()
        .map(|layer| VerifiedLayer::open(layer, manifest.virtual_size))
        .collect::<Result<Vec<_>, _>>()?;
    let mut newest = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        for (pos, &cluster) in layer.index.iter().enumerate() {
            newest.insert(cluster, (i, pos));
        }
    }
    Ok((layers, newest))
}

/// Recreates a disk: a new overlay at `overlay_path` over `base` (`base_len` bytes) holding the
/// chain's clusters. The overlay is built under a temporary name and renamed into place only
/// when complete and durable, so a failed restore leaves nothing behind.
pub fn restore(
    base: File,
    base_len: u64,
    manifest: &DiskManifest,
    overlay_path: &Path,
) -> Result<Overlay, LayerError> {
    if manifest.virtual_size != base_len {
        return Err(LayerError::BaseSize {
            manifest: manifest.virtual_size,
            base: base_len,
        });
    }
    if overlay_path.exists() {
        return Err(LayerError::OverlayExists(overlay_path.to_owned()));
    }
    let (layers, newest) = resolve(manifest)?;
    let mut partial = overlay_path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    let built = (|| {
        let mut overlay = Overlay::open(base, base_len, &partial)?;
        let mut buf = vec![0u8; CLUSTER_BYTES];
        for (&cluster, &(layer, pos)) in &newest {
            layers[layer]
                .read(pos, &mut buf)
                .map_err(io_err("read", &manifest.layers[layer].path))?;
            overlay
                .write_cluster(cluster, &buf)
                .map_err(io_err("write", &partial))?;
        }
        overlay.flush().map_err(io_err("sync", &partial))?;
        std::fs::rename(&partial, overlay_path).map_err(io_err("rename", &partial))?;
        overlay.set_path(overlay_path);
        Ok::<_, LayerError>(overlay)
    })();
    if built.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    built
}

/// Merges the whole chain of `manifest` into one full layer at `path`; returns the manifest of
/// the merged chain (that single layer). The inputs are left in place for the caller to delete.
pub fn merge(manifest: &DiskManifest, path: &Path) -> Result<DiskManifest, LayerError> {
    let (layers, newest) = resolve(manifest)?;
    let clusters: Vec<u64> = newest.keys().copied().collect();
    let layer = write_layer(
        path,
        LayerKind::Full,
        manifest.virtual_size,
        &clusters,
        |cluster, buf| {
            let (layer, pos) = newest[&cluster];
            layers[layer].read(pos, buf)
        },
    )?;
    Ok(DiskManifest {
        virtual_size: manifest.virtual_size,
        cluster_size: manifest.cluster_size,
        layers: vec![layer],
    })
}

#[cfg(test)]
mod tests;
