//! Everything that shapes the kernel, gathered before building so the cache key covers it.

use std::path::PathBuf;
use std::process::Command;

use super::KernelError;
use crate::cache::{CacheKey, CacheKeyBuilder};

/// Debian package that ships the kernel source tarball.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Where that package puts the tarball.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The compiler the kernel's Makefile uses by default.
pub const COMPILER: &str = "gcc";

/// The inputs of one kernel build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The config fragment text.
    pub fragment: String,
    /// Bumped whenever the build steps change in a way that changes the output.
    pub recipe_version: u32,
    /// Version of [`SOURCE_PACKAGE`] as dpkg reports it (e.g. `6.1.192-2`).
    pub source_version: String,
    /// First line of `gcc --version`.
    pub compiler_version: String,
    /// The source tarball.
    pub tarball: PathBuf,
}

impl Inputs {
    /// Reads the installed source package and compiler versions.
    pub fn detect(fragment: &str, recipe_version: u32) -> Result<Self, KernelError> {
        let tarball = PathBuf::from(SOURCE_TARBALL);
        let not_installed = || KernelError::SourceNotInstalled {
            package: SOURCE_PACKAGE,
            tarball: tarball.clone(),
        };
        if !tarball.is_file() {
            return Err(not_installed());
        }
        let source_version = query("dpkg-query", &["-W", "-f=${Version}", SOURCE_PACKAGE])
            .ok_or_else(not_installed)?;
        let compiler_version = query(COMPILER, &["--version"])
            .and_then(|out| out.lines().next().map(str::to_owned))
            .ok_or(KernelError::CompilerMissing { compiler: COMPILER })?;
        Ok(Self {
            fragment: fragment.to_owned(),
            recipe_version,
            source_version,
            compiler_version,
            tarball,
        })
    }

    /// The cache key: fragment text, recipe version, source package version, compiler version.
    /// The tarball's path is not part of it (the package version pins its contents).
    pub fn cache_key(&self) -> CacheKey {
        CacheKeyBuilder::new(super::INDEX_NAME)
            .add("recipe", self.recipe_version.to_string().as_bytes())
            .add("fragment", self.fragment.as_bytes())
            .add("source-package", SOURCE_PACKAGE.as_bytes())
            .add("source-version", self.source_version.as_bytes())
            .add("compiler", self.compiler_version.as_bytes())
            .finish()
    }
}

/// Trimmed stdout of a successful, non-empty query; `None` otherwise.
fn query(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            fragment: "CONFIG_A=y\n".into(),
            recipe_version: 1,
            source_version: "6.1.192-2".into(),
            compiler_version: "gcc (Debian 12.2.0-14+deb12u1) 12.2.0".into(),
            tarball: PathBuf::from(SOURCE_TARBALL),
        }
    }

    #[test]
    fn cache_key_changes_with_every_input_that_shapes_the_kernel() {
        let base = inputs().cache_key();
        assert_eq!(base, inputs().cache_key());
        let changed: [fn(&mut Inputs); 4] = [
            |i| i.fragment.push_str("# CONFIG_B is not set\n"),
            |i| i.recipe_version += 1,
            |i| i.source_version = "6.1.193-1".into(),
            |i| i.compiler_version = "gcc (Debian 12.2.0-15) 12.2.0".into(),
        ];
        for change in changed {
            let mut other = inputs();
            change(&mut other);
            assert_ne!(other.cache_key(), base, "{other:?}");
        }
    }

    #[test]
    fn cache_key_ignores_where_the_tarball_lives() {
        let mut moved = inputs();
        moved.tarball = PathBuf::from("/elsewhere/linux.tar.xz");
        assert_eq!(moved.cache_key(), inputs().cache_key());
    }

    #[test]
    fn query_reports_failure_and_empty_output_as_none() {
        assert_eq!(query("sh", &["-c", "echo ' 1.2 '"]), Some("1.2".into()));
        assert_eq!(query("sh", &["-c", "echo x; exit 1"]), None);
        assert_eq!(query("sh", &["-c", "true"]), None);
        assert_eq!(query("roost-no-such-tool", &[]), None);
    }
}
