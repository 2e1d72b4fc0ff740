//! The host VM's kernel: Debian's current cloud kernel, found through the metapackage
//! `linux-image-cloud-amd64`, downloaded with `apt-get download`, and cached by package
//! version together with the closure of the modules the host VM carries.
//!
//! Cache entry layout (`<cache>/hostvm-kernel/<key>/`): `vmlinuz`, `vmlinux` (the same kernel
//! decompressed, when that worked), `release` (the `uname -r` string) and
//! `root/lib/modules/<release>/` (the module closure, indexed by `depmod`).
//!
//! QEMU boots the uncompressed `vmlinux` through its PVH entry (the cloud kernel has
//! `CONFIG_PVH`): that skips SeaBIOS's `-kernel` path and the in-guest decompression, which
//! under TCG saved about a second of every boot here.

use std::path::{Path, PathBuf};
use std::process::Command;

use roost_images::{Cache, CacheKeyBuilder, Origin, Progress, run_logged};

use crate::HostVmError;
use crate::modules::{self, CARRIED};

/// The metapackage that always depends on the current cloud kernel.
pub const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Bumped whenever the layout or contents of the kernel cache entry change.
const RECIPE: &str = "hostvm-kernel-2";

/// A kernel ready to boot the host VM.
#[derive(Debug, Clone)]
pub struct HostKernel {
    /// Debian package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Its version, e.g. `6.1.192-2`.
    pub version: String,
    /// `uname -r` inside the host VM.
    pub release: String,
    /// The compressed kernel image (bzImage).
    pub vmlinuz: PathBuf,
    /// What the host VM boots: the uncompressed ELF kernel, or `vmlinuz` if it could not be
    /// extracted.
    pub boot_image: PathBuf,
    /// A directory holding `lib/modules/<release>/` with the carried modules.
    pub modules_root: PathBuf,
    /// The cache key (it also keys the initramfs built on top).
    pub key: String,
    pub origin: Origin,
}

impl HostKernel {
    /// Returns the cached kernel for the current package version, downloading and preparing it
    /// first if needed.
    pub fn ensure(cache: &Cache, progress: &Progress) -> Result<Self, HostVmError> {
        let package = resolve_package()?;
        let version = package_version(&package)?;
        let mut key = CacheKeyBuilder::new("hostvm-kernel");
        key.add("recipe", RECIPE.as_bytes())
            .add("package", package.as_bytes())
            .add("version", version.as_bytes());
        for (module, _) in CARRIED {
            key.add("module", module.as_bytes());
        }
        let key = key.finish();
        let entry = cache.entry("hostvm-kernel", &key);
        let (dir, origin) = entry.get_or_build(|staging| {
            let task = progress.task("host VM kernel");
            task.phase(&format!("downloading {package} {version}"));
            let result = prepare(&package, staging, &task);
            task.finish(if result.is_ok() { "ready" } else { "failed" });
            result
        })?;
        let release = std::fs::read_to_string(dir.join("release"))
            .map_err(|source| HostVmError::Io {
                path: dir.join("release"),
                source,
            })?
            .trim()
            .to_owned();
        let vmlinux = dir.join("vmlinux");
        Ok(Self {
            package,
            version,
            release,
            boot_image: if vmlinux.exists() {
                vmlinux
            } else {
                dir.join("vmlinuz")
            },
            vmlinuz: dir.join("vmlinuz"),
            modules_root: dir.join("root"),
            key: key.as_str().to_owned(),
            origin,
        })
    }

    /// The module directory for this release (`.../lib/modules/<release>`).
    pub fn modules_dir(&self) -> PathBuf {
        self.modules_root.join("lib/modules").join(&self.release)
    }
}

fn apt_query(args: &[&str]) -> Result<String, HostVmError> {
    let what = format!("apt-cache {}", args.join(" "));
    let output = Command::new("apt-cache")
        .args(args)
        .output()
        .map_err(|e| HostVmError::KernelPackage(format!("cannot run `{what}`: {e}")))?;
    if !output.status.success() {
        return Err(HostVmError::KernelPackage(format!(
            "`{what}` failed: {}; run `apt-get update` first",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn resolve_package() -> Result<String, HostVmError> {
    let text = apt_query(&["depends", METAPACKAGE])?;
    parse_depends(&text).ok_or_else(|| {
        HostVmError::KernelPackage(format!(
            "{METAPACKAGE} depends on no linux-image package (apt-cache said: {}); run `apt-get update`",
            text.trim()
        ))
    })
}

/// The kernel image package among `apt-cache depends` output.
pub fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && !name.starts_with('<'))
        .map(str::to_owned)
}

fn package_version(package: &str) -> Result<String, HostVmError> {
    let text = apt_query(&["show", "--no-all-versions", package])?;
    parse_version(&text).ok_or_else(|| {
        HostVmError::KernelPackage(format!("`apt-cache show {package}` gave no Version field"))
    })
}

/// The `Version:` field of `apt-cache show` output.
pub fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
}

fn prepare(package: &str, staging: &Path, task: &roost_images::Task) -> Result<(), HostVmError> {
    let work = tempfile::Builder::new()
        .prefix("roost-hostvm-kernel-")
        .tempdir()
        .map_err(|source| HostVmError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let log = staging.join("build.log");
    let tool = |what: &'static str| move |source| HostVmError::Tool { what, source };
    run_logged(
        Command::new("apt-get")
            .args(["download", "-o", "APT::Sandbox::User=root", package])
            .current_dir(work.path()),
        task,
        &log,
        |_| {},
    )
    .map_err(tool("downloading the host VM kernel package"))?;
    let deb = std::fs::read_dir(work.path())
        .map_err(|source| HostVmError::Io {
            path: work.path().to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| {
            HostVmError::KernelPackage(format!("apt-get download {package} left no .deb"))
        })?;
    let extracted = work.path().join("x");
    task.phase("extracting");
    run_logged(
        Command::new("dpkg").arg("-x").arg(&deb).arg(&extracted),
        task,
        &log,
        |_| {},
    )
    .map_err(tool("extracting the host VM kernel package"))?;

    // Debian has shipped modules under /lib and, with merged /usr, under /usr/lib.
    let base = [extracted.clone(), extracted.join("usr")]
        .into_iter()
        .find(|b| b.join("lib/modules").is_dir())
        .ok_or_else(|| HostVmError::KernelPackage(format!("{package} has no lib/modules")))?;
    let release = single_dir_name(&base.join("lib/modules"))?;
    let vmlinuz = extracted.join("boot").join(format!("vmlinuz-{release}"));
    copy(&vmlinuz, &staging.join("vmlinuz"))?;
    task.phase("decompressing the kernel");
    match extract_vmlinux(&vmlinuz) {
        Some(elf) => {
            std::fs::write(staging.join("vmlinux"), elf).map_err(|source| HostVmError::Io {
                path: staging.join("vmlinux"),
                source,
            })?
        }
        None => tracing::warn!(
            "cannot decompress {}; the host VM boots the bzImage",
            vmlinuz.display()
        ),
    }

    task.phase("computing the module closure");
    run_logged(
        Command::new("depmod").arg("-b").arg(&base).arg(&release),
        task,
        &log,
        |_| {},
    )
    .map_err(tool("indexing the kernel package's modules"))?;
    let modules_dir = base.join("lib/modules").join(&release);
    let mut closures = Vec::new();
    for (module, _) in CARRIED {
        let output = Command::new("modprobe")
            .args(["--show-depends", "-d"])
            .arg(&base)
            .args(["-S", &release, module])
            .output()
            .map_err(|e| {
                HostVmError::KernelPackage(format!("cannot run modprobe (install kmod): {e}"))
            })?;
        if !output.status.success() {
            return Err(HostVmError::ModuleMissing {
                module: (*module).to_owned(),
                release: release.clone(),
                message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let steps = modules::parse_show_depends(&String::from_utf8_lossy(&output.stdout)).map_err(
            |message| HostVmError::ModuleMissing {
                module: (*module).to_owned(),
                release: release.clone(),
                message,
            },
        )?;
        closures.push(steps);
    }
    let files =
        modules::closure_files(&closures, &modules_dir).map_err(HostVmError::KernelPackage)?;
    let target_dir = staging.join("root/lib/modules").join(&release);
    for file in &files {
        copy(&modules_dir.join(file), &target_dir.join(file))?;
    }
    for index in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if modules_dir.join(index).exists() {
            copy(&modules_dir.join(index), &target_dir.join(index))?;
        }
    }
    run_logged(
        Command::new("depmod")
            .arg("-b")
            .arg(staging.join("root"))
            .arg(&release),
        task,
        &log,
        |_| {},
    )
    .map_err(tool("indexing the host VM's modules"))?;
    std::fs::write(staging.join("release"), format!("{release}\n")).map_err(|source| {
        HostVmError::Io {
            path: staging.join("release"),
            source,
        }
    })?;
    task.phase(&format!("{} module files for {release}", files.len()));
    Ok(())
}

/// Compression formats a bzImage payload may use: (magic, decompressor).
const PAYLOADS: &[(&[u8], &str)] = &[
    (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
    (&[0x1f, 0x8b, 0x08], "gzip"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
];

/// The ELF kernel inside a bzImage, found the way the kernel's `extract-vmlinux` does: try each
/// compression magic and keep the first stream that decompresses to an ELF file.
pub fn extract_vmlinux(bzimage: &Path) -> Option<Vec<u8>> {
    let image = std::fs::read(bzimage).ok()?;
    for (magic, tool) in PAYLOADS {
        let Some(offset) = image.windows(magic.len()).position(|w| w == *magic) else {
            continue;
        };
        if let Some(elf) =
            decompress(tool, &image[offset..]).filter(|out| out.starts_with(b"\x7fELF"))
        {
            return Some(elf);
        }
    }
    None
}

/// Runs `tool -dc` over `input`; the exit status is ignored because a bzImage has data after
/// the compressed stream, which some decompressors report as an error after a full output.
fn decompress(tool: &str, input: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = stdin.write_all(input);
        });
        child.wait_with_output().ok().map(|out| out.stdout)
    })
}

fn single_dir_name(dir: &Path) -> Result<String, HostVmError> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|source| HostVmError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(HostVmError::KernelPackage(format!(
            "expected one kernel release under {}, found {names:?}",
            dir.display()
        ))),
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), HostVmError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|source| HostVmError::Io {
            path: parent.to_owned(),
            source,
        })?;
    }
    std::fs::copy(from, to).map_err(|source| HostVmError::Io {
        path: from.to_owned(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernel_package_among_depends() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let alternatives = "linux-image-cloud-amd64\n |Depends: linux-image-6.1.0-57-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64-unsigned\n";
        assert_eq!(
            parse_depends(alternatives).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(
            parse_depends("linux-image-cloud-amd64\n  Recommends: x\n"),
            None
        );
        assert_eq!(parse_depends("x\n  Depends: <linux-image-virtual>\n"), None);
    }

    #[test]
    fn extracts_an_elf_from_a_compressed_payload() {
        let dir = tempfile::tempdir().unwrap();
        let elf = [b"\x7fELF".as_slice(), &[7u8; 4096]].concat();
        let compressed = {
            let mut child = Command::new("gzip")
                .arg("-c")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), &elf).unwrap();
            child.wait_with_output().unwrap().stdout
        };
        // A fake bzImage: setup code, the compressed kernel, trailing data.
        let image = [vec![0u8; 512], compressed, vec![0xaa; 64]].concat();
        let path = dir.path().join("vmlinuz");
        std::fs::write(&path, image).unwrap();
        assert_eq!(extract_vmlinux(&path).unwrap(), elf);
        std::fs::write(&path, [0u8; 1024]).unwrap();
        assert_eq!(extract_vmlinux(&path), None);
    }

    #[test]
    fn reads_the_version_field() {
        let text = "Package: linux-image-6.1.0-56-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\n";
        assert_eq!(parse_version(text).as_deref(), Some("6.1.192-2"));
        assert_eq!(parse_version("Package: x\n"), None);
    }
}
