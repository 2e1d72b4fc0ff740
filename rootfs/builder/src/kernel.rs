//! The microVM guest kernel: Debian's `linux-source-6.1` configured from `make tinyconfig` plus
//! the fragment in `rootfs/kernel/microvm.config`, built as an uncompressed `vmlinux` with a PVH
//! entry note, and cached by a hash of its inputs.
//!
//! Published cache entry (`<cache>/kernel/<key>/`): `vmlinux`, the final `config`, and
//! `build-steps` (how many kbuild steps the build took, the next build's progress estimate).
//! The build log stays at `<cache>/logs/kernel-<key>.log`.

mod config;
mod elf;
mod inputs;
mod kbuild;
mod workdir;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use config::{KconfigText, Mismatch, Setting, SyntaxError, verify};
pub use elf::ElfProblem;
pub use inputs::{Inputs, SOURCE_PACKAGE, SOURCE_TARBALL};

use crate::cache::{Cache, CacheError};
use crate::index::{Artefact, ArtefactIndex, IndexError};
use crate::progress::{Progress, Task};
use crate::run::RunError;
use crate::{Built, Origin};
use kbuild::Build;
use workdir::WorkDir;

/// Name of the kernel in the [`ArtefactIndex`] and its kind in the [`Cache`].
pub const INDEX_NAME: &str = "kernel";

/// The config fragment merged over `tinyconfig`.
pub const FRAGMENT: &str = include_str!("../../kernel/microvm.config");

/// Where [`FRAGMENT`] lives in the repository, for error messages.
pub const FRAGMENT_PATH: &str = "rootfs/kernel/microvm.config";

/// Bump when the build steps change in a way that changes the output.
pub const RECIPE_VERSION: u32 = 1;

/// Architecture passed to kbuild (`tinyconfig` would otherwise produce a 32-bit kernel).
const ARCH: &str = "x86_64";

/// kbuild steps (`CC`, `AS`, `LD`, ...) of a full build of this recipe, measured; the progress
/// bar uses it until a previous build has recorded its own count.
const ESTIMATED_BUILD_STEPS: u64 = 1400;

/// File in the cache entry holding the number of kbuild steps the build took.
const BUILD_STEPS_FILE: &str = "build-steps";

/// Errors building the guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "the kernel source is not installed (no {tarball}); install it with \
         `apt-get install {package}`"
    )]
    SourceNotInstalled {
        package: &'static str,
        tarball: PathBuf,
    },
    #[error(
        "cannot run `{compiler} --version`; install the build tools (`apt-get install build-essential bc bison flex libelf-dev libssl-dev`)"
    )]
    CompilerMissing { compiler: &'static str },
    #[error("{FRAGMENT_PATH} is malformed")]
    Fragment(#[source] SyntaxError),
    #[error("the generated .config at {path} is malformed")]
    FinalConfig {
        path: PathBuf,
        #[source]
        source: SyntaxError,
    },
    #[error(
        "{} option(s) of {FRAGMENT_PATH} did not hold after `make olddefconfig` (a typo, or a \
         dependency that is not enabled); fix the fragment (full config: {config}):\n  {}",
        mismatches.len(),
        mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
    )]
    OptionsDidNotStick {
        mismatches: Vec<Mismatch>,
        config: PathBuf,
    },
    #[error("kernel build step `{step}` failed")]
    Step {
        step: &'static str,
        #[source]
        source: RunError,
    },
    #[error("the kernel source tarball {tarball} did not unpack into a single directory")]
    UnexpectedTarball { tarball: PathBuf },
    #[error("the built kernel {path} cannot be booted by the VMM")]
    NotBootable {
        path: PathBuf,
        #[source]
        source: ElfProblem,
    },
    #[error("kernel build I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Ensures the guest kernel is built: a cache hit when the inputs are unchanged, otherwise a
/// full build (several minutes). Records the result in the index under [`INDEX_NAME`].
pub fn build(cache: &Cache, progress: &Progress) -> Result<Built, KernelError> {
    let started = Instant::now();
    let task = progress.task(INDEX_NAME);
    let result = ensure(cache, &task, started);
    match &result {
        Ok(built) => task.finish(&match built.origin {
            Origin::Cached => format!("cached ({})", short_key(&built.artefact)),
            Origin::Built => format!(
                "built {} in {}s ({} MiB)",
                short_key(&built.artefact),
                built.duration.as_secs(),
                built.artefact.size_bytes >> 20
            ),
        }),
        Err(_) => task.finish("failed"),
    }
    result
}

fn short_key(artefact: &Artefact) -> &str {
    artefact.key.get(..16).unwrap_or(&artefact.key)
}

fn ensure(cache: &Cache, task: &Task, started: Instant) -> Result<Built, KernelError> {
    let fragment = KconfigText::parse(FRAGMENT).map_err(KernelError::Fragment)?;
    let inputs = Inputs::detect(FRAGMENT, RECIPE_VERSION)?;
    let key = inputs.cache_key();
    let entry = cache.entry(INDEX_NAME, &key);
    let index = ArtefactIndex::new(cache);
    let (dir, origin) = entry.get_or_build(|staging| {
        let estimate = index
            .lookup(INDEX_NAME)
            .ok()
            .and_then(|previous| previous.path.parent().map(|dir| dir.join(BUILD_STEPS_FILE)))
            .and_then(|path| fs::read_to_string(path).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(ESTIMATED_BUILD_STEPS);
        let logs = cache.root().join("logs");
        fs::create_dir_all(&logs).map_err(io_error(&logs))?;
        let log = logs.join(format!("{INDEX_NAME}-{}.log", key.short()));
        // A fresh log per attempt; `run_logged` appends.
        fs::write(&log, "").map_err(io_error(&log))?;
        let work_parent = cache.root().join(INDEX_NAME);
        // Removed when dropped, whether the build succeeds, fails or panics.
        let work = WorkDir::create(&work_parent, key.as_str()).map_err(io_error(&work_parent))?;
        let build = Build {
            inputs: &inputs,
            fragment: &fragment,
            task,
            log: &log,
            work: work.path(),
        };
        build.run(staging, estimate)
    })?;
    let vmlinux = dir.join("vmlinux");
    let size_bytes = fs::metadata(&vmlinux).map_err(io_error(&vmlinux))?.len();
    let artefact = Artefact {
        name: INDEX_NAME.to_owned(),
        path: vmlinux,
        key: key.as_str().to_owned(),
        size_bytes,
    };
    index.record(&artefact)?;
    Ok(Built {
        artefact,
        origin,
        duration: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_fragment_parses_and_sets_the_essentials() {
        let fragment = KconfigText::parse(FRAGMENT).unwrap();
        assert!(fragment.len() > 50, "only {} options", fragment.len());
        for name in [
            "CONFIG_64BIT",
            "CONFIG_PVH",
            "CONFIG_KVM_GUEST",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_EXT4_FS",
            "CONFIG_DEVTMPFS_MOUNT",
            "CONFIG_SECCOMP_FILTER",
        ] {
            assert_eq!(fragment.get(name), Some(&Setting::Yes), "{name}");
        }
        for name in [
            "CONFIG_MODULES",
            "CONFIG_PCI",
            "CONFIG_ACPI",
            "CONFIG_RTC_CLASS",
            "CONFIG_SERIO",
        ] {
            assert_eq!(fragment.get(name), Some(&Setting::No), "{name}");
        }
        assert_eq!(
            fragment.get("CONFIG_NR_CPUS"),
            Some(&Setting::Value("16".into()))
        );
    }

    #[test]
    fn a_dropped_fragment_option_fails_with_a_message_naming_it() {
        let fragment = KconfigText::parse(FRAGMENT).unwrap();
        let mut final_text = FRAGMENT.replace(
            "CONFIG_VIRTIO_VSOCKETS=y",
            "# CONFIG_VIRTIO_VSOCKETS is not set",
        );
        final_text = final_text.replace("CONFIG_PVH=y\n", "");
        let final_config = KconfigText::parse(&final_text).unwrap();
        let mismatches = verify(&fragment, &final_config);
        assert_eq!(mismatches.len(), 2);
        let message = KernelError::OptionsDidNotStick {
            mismatches,
            config: PathBuf::from("/tmp/config"),
        }
        .to_string();
        assert!(
            message.starts_with("2 option(s) of rootfs/kernel/microvm.config"),
            "{message}"
        );
        assert!(
            message.contains("CONFIG_PVH: wanted y, absent"),
            "{message}"
        );
        assert!(
            message.contains("CONFIG_VIRTIO_VSOCKETS: wanted y, got not set"),
            "{message}"
        );
    }

    #[test]
    fn missing_source_names_the_package_to_install() {
        let message = KernelError::SourceNotInstalled {
            package: SOURCE_PACKAGE,
            tarball: PathBuf::from(SOURCE_TARBALL),
        }
        .to_string();
        assert!(
            message.contains("apt-get install linux-source-6.1"),
            "{message}"
        );
    }
}
