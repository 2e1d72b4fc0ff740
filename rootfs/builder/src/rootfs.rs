//! Root filesystem images for the guest: `base` and `code-interpreter`, each a sparse ext4
//! file built from Debian 12 packages with roost-agent as `/sbin/init`.
//!
//! Two cache levels, so that a new agent binary does not redo debootstrap:
//! 1. `rootfs-tree/<key>/tree.tar`: the debootstrapped tree (plus `packages.txt`, the
//!    installed package versions), keyed on the package list, suite, architecture, variant
//!    and tree recipe version ([`tree`]).
//! 2. `rootfs-image/<key>/rootfs.ext4`: the configured, verified and packed image, keyed on
//!    the tree's key, `rootfs/image/configure.sh`, the verify scripts, the agent binary's
//!    SHA-256 and the packing parameters ([`image`]). `packages.txt` and `image.json` sit
//!    next to it.
//!
//! The recipe files under `rootfs/image/` are compiled in ([`recipe`]); the Debian mirror is
//! read at run time ([`mirror`]).

mod image;
mod mirror;
mod recipe;
mod tree;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Instant;

pub use mirror::MIRROR_ENV;

use crate::Built;
use crate::cache::{Cache, CacheError, Origin};
use crate::index::{Artefact, ArtefactIndex, IndexError};
use crate::progress::Progress;
use crate::run::RunError;

/// File name of the ext4 image inside its cache entry.
pub const IMAGE_FILE: &str = "rootfs.ext4";
/// File name of the package manifest (`name<TAB>version<TAB>arch` per line, from
/// `dpkg-query`) next to the image.
pub const MANIFEST_FILE: &str = "packages.txt";
/// File name of the image's build facts (sizes, keys) next to the image.
pub const META_FILE: &str = "image.json";
/// Cache kinds of the two levels.
const TREE_KIND: &str = "rootfs-tree";
const IMAGE_KIND: &str = "rootfs-image";

/// A root filesystem image Roost knows how to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageName {
    /// Minimal Debian with a shell, Python, git, curl and sudo.
    Base,
    /// `Base` plus a Jupyter Python kernel, numpy, pandas and matplotlib.
    CodeInterpreter,
}

impl ImageName {
    /// Every image, in build order.
    pub const ALL: [Self; 2] = [Self::Base, Self::CodeInterpreter];

    /// The image's name: `base`, `code-interpreter`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::CodeInterpreter => "code-interpreter",
        }
    }

    /// The name it is recorded under in the [`ArtefactIndex`].
    pub fn index_name(self) -> &'static str {
        match self {
            Self::Base => "rootfs-base",
            Self::CodeInterpreter => "rootfs-code-interpreter",
        }
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`ImageName::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown image `{0}`: expected `base` or `code-interpreter`")]
pub struct UnknownImage(pub String);

impl FromStr for ImageName {
    type Err = UnknownImage;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|image| image.as_str() == s)
            .ok_or_else(|| UnknownImage(s.into()))
    }
}

/// Errors building a root filesystem image.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("roost-agent binary not found at {0}: run `cargo build --release -p roost-agent`")]
    AgentMissing(PathBuf),
    #[error("{program} not found: apt-get install {package}")]
    ToolMissing {
        program: &'static str,
        package: &'static str,
    },
    #[error(
        "building root filesystems needs root (debootstrap, chroot, device nodes): run as root"
    )]
    NotRoot,
    #[error(
        "no Debian mirror for `{suite}` with component `{component}` in /etc/apt/sources.list or \
         /etc/apt/sources.list.d/: set {MIRROR_ENV} to the mirror's URL (the one apt uses)"
    )]
    NoMirror {
        suite: &'static str,
        component: &'static str,
    },
    #[error("{step} failed")]
    Step {
        step: String,
        #[source]
        source: RunError,
    },
    #[error("`{command}` printed output that cannot be used")]
    BadOutput { command: String },
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the packed image has {free_bytes} bytes free, less than the {wanted_bytes} promised; \
         the size estimate in rootfs/builder/src/rootfs/image.rs needs more slack"
    )]
    TooSmall { free_bytes: u64, wanted_bytes: u64 },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl RootfsError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn step(step: impl Into<String>) -> impl FnOnce(RunError) -> Self {
        move |source| Self::Step {
            step: step.into(),
            source,
        }
    }
}

/// Ensures `image` is built with `agent_bin` as its `/sbin/init`, records it in the index
/// under [`ImageName::index_name`] and returns it. `Built.artefact.path` is the `.ext4` file.
///
/// A cache hit needs neither root nor network; a build needs root, debootstrap, e2fsprogs and
/// the Debian mirror from the host's apt configuration (or `$ROOST_DEBIAN_MIRROR`).
pub fn build(
    cache: &Cache,
    progress: &Progress,
    image: ImageName,
    agent_bin: &Path,
) -> Result<Built, RootfsError> {
    let started = Instant::now();
    if !agent_bin.is_file() {
        return Err(RootfsError::AgentMissing(agent_bin.to_owned()));
    }
    let tree_key = tree::key(image);
    let image_key = image::key(image, &tree_key, agent_bin)?;
    let task = progress.task(&format!("rootfs {image}"));
    let (dir, origin) = cache
        .entry(IMAGE_KIND, &image_key)
        .get_or_build(|staging| {
            preflight()?;
            let tree_dir = tree::ensure(cache, &task, image, &tree_key)?;
            let log = log_path(cache, &format!("rootfs-image-{image}"), &image_key)?;
            image::build(
                &task, image, &tree_dir, agent_bin, &image_key, staging, &log,
            )
        })?;
    let path = dir.join(IMAGE_FILE);
    let size_bytes = std::fs::metadata(&path)
        .map_err(RootfsError::io(&path))?
        .len();
    let artefact = Artefact {
        name: image.index_name().to_owned(),
        path,
        key: image_key.as_str().to_owned(),
        size_bytes,
    };
    ArtefactIndex::new(cache).record(&artefact)?;
    let allocated = allocated_bytes(&artefact.path).unwrap_or(0);
    let how = match origin {
        Origin::Cached => "from cache",
        Origin::Built => "built",
    };
    task.finish(&format!(
        "{how}: {} ({} MiB, {} MiB allocated) key {image_key}",
        artefact.path.display(),
        size_bytes >> 20,
        allocated >> 20,
    ));
    Ok(Built {
        artefact,
        origin,
        duration: started.elapsed(),
    })
}

/// A fresh build log `<cache>/logs/<what>-<short key>.log`: kept outside the staging
/// directory so that it survives a failed build.
fn log_path(
    cache: &Cache,
    what: &str,
    key: &crate::cache::CacheKey,
) -> Result<PathBuf, RootfsError> {
    let dir = cache.root().join("logs");
    std::fs::create_dir_all(&dir).map_err(RootfsError::io(&dir))?;
    let path = dir.join(format!("{what}-{}.log", key.short()));
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(RootfsError::io(&path)(e)),
        _ => {}
    }
    Ok(path)
}

/// Bytes a (sparse) file really occupies on disk.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Checks what a build (not a cache hit) needs, with a fix for each gap.
fn preflight() -> Result<(), RootfsError> {
    for (program, package) in [
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("dumpe2fs", "e2fsprogs"),
        ("chroot", "coreutils"),
        ("mount", "mount"),
        ("tar", "tar"),
        ("dpkg-query", "dpkg"),
    ] {
        if find_program(program).is_none() {
            return Err(RootfsError::ToolMissing { program, package });
        }
    }
    if !is_root() {
        return Err(RootfsError::NotRoot);
    }
    Ok(())
}

/// The absolute path of `program`, looked up in `$PATH` and the sbin directories (which a
/// non-login root shell may lack in `$PATH`).
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A command for `program`, resolved with [`find_program`] so sbin tools are found.
fn tool(program: &str) -> Command {
    Command::new(find_program(program).unwrap_or_else(|| PathBuf::from(program)))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Lazily unmounts every mount at or below `root` (deepest first). Best effort.
fn unmount_below(root: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(root))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    for point in points {
        let status = tool("umount").arg("--lazy").arg(&point).status();
        if !status.is_ok_and(|s| s.success()) {
            tracing::warn!(path = %point.display(), "could not unmount");
        }
    }
}

/// Runs `command` and returns its stdout (for small outputs such as dpkg-query's).
fn capture(command: &mut Command) -> Result<String, RootfsError> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|source| RootfsError::Io {
        path: PathBuf::from(command.get_program()),
        source,
    })?;
    if !output.status.success() {
        return Err(RootfsError::BadOutput { command: shown });
    }
    String::from_utf8(output.stdout).map_err(|_| RootfsError::BadOutput { command: shown })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_round_trip() {
        for image in ImageName::ALL {
            assert_eq!(image.as_str().parse::<ImageName>().unwrap(), image);
            assert_eq!(image.to_string(), image.as_str());
            assert_eq!(image.index_name(), format!("rootfs-{image}"));
        }
        let err = "alpine".parse::<ImageName>().unwrap_err();
        assert!(err.to_string().contains("code-interpreter"), "{err}");
    }

    #[test]
    fn missing_agent_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let missing = dir.path().join("roost-agent");
        let err = build(&cache, &Progress::silent(), ImageName::Base, &missing).unwrap_err();
        assert!(matches!(err, RootfsError::AgentMissing(_)));
        assert!(
            err.to_string()
                .contains("cargo build --release -p roost-agent"),
            "{err}"
        );
    }

    #[test]
    fn changing_the_agent_changes_only_the_image_key() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, "one").unwrap();
        let tree_key = tree::key(ImageName::Base);
        let first = image::key(ImageName::Base, &tree_key, &agent).unwrap();
        std::fs::write(&agent, "two").unwrap();
        let second = image::key(ImageName::Base, &tree_key, &agent).unwrap();
        assert_ne!(first, second);
        assert_eq!(tree_key, tree::key(ImageName::Base));
        assert_ne!(tree_key, tree::key(ImageName::CodeInterpreter));
        let other_tree = image::key(ImageName::CodeInterpreter, &tree_key, &agent).unwrap();
        assert_ne!(second, other_tree);
    }
}
