//! The per-run archive appended to the base initramfs: the project's binaries (on `PATH` as
//! `/opt/roost/bin`), the command and its environment (`/opt/roost/run`), the disk names
//! (`/etc/roost/disks`) and an artefact index (`/opt/roost/cache/index`) whose records point at
//! in-VM locations, so code inside the host VM finds the kernel and images with
//! `ArtefactIndex::lookup` exactly as it does outside.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use roost_images::{Artefact, ArtefactIndex, Cache};

use crate::HostVmError;
use crate::cpio::Manifest;
use crate::initramfs::add_libraries;
use crate::ldd;

/// `ROOST_CACHE_DIR` inside the host VM.
pub const GUEST_CACHE_DIR: &str = "/opt/roost/cache";
/// Where the project's binaries go inside the host VM.
pub const GUEST_BIN_DIR: &str = "/opt/roost/bin";
/// Where attached images appear inside the host VM (symlinks to `/dev/vdX`).
pub const GUEST_DISK_DIR: &str = "/dev/roost";

/// An image attached to the host VM as a read-only virtio disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedImage {
    /// The artefact as recorded outside.
    pub artefact: Artefact,
    /// The virtio-blk serial that `/init` matches (at most 20 bytes).
    pub serial: String,
}

impl AttachedImage {
    /// The path of the disk inside the host VM.
    pub fn guest_path(&self) -> String {
        format!("{GUEST_DISK_DIR}/{}", self.artefact.name)
    }
}

/// Everything one run adds to the base initramfs.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub binaries: Vec<PathBuf>,
    /// Artefacts copied into the initramfs (the guest kernel), with the outside cache root.
    pub files: Vec<Artefact>,
    pub images: Vec<AttachedImage>,
    pub outside_cache_root: PathBuf,
    /// Other host files, at the given in-VM paths.
    pub extra_files: Vec<(String, PathBuf)>,
    /// Copy binaries without their debug info (`objcopy --strip-debug`): debug builds shrink
    /// several times, and every megabyte of initramfs costs boot time under TCG.
    pub strip_debug: bool,
}

impl Overlay {
    /// Builds the archive's manifest; `scratch` holds generated files until it is written, and
    /// `base_files` lists what the base archive already has.
    pub fn manifest(
        &self,
        scratch: &Path,
        base_files: &HashSet<String>,
    ) -> Result<Manifest, HostVmError> {
        let mut m = Manifest::new();
        m.bytes("/opt/roost/run/cmd", command_script(&self.command)?, 0o755)?;
        m.bytes("/opt/roost/run/env", env_script(&self.env)?, 0o644)?;
        m.bytes("/etc/roost/disks", disks_file(&self.images), 0o644)?;

        let mut libs = Vec::new();
        for binary in &self.binaries {
            let name = binary
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| crate::cpio::CpioError::BadPath(binary.display().to_string()))?;
            let copy = if self.strip_debug {
                stripped(binary, &scratch.join("bin"))?
            } else {
                binary.clone()
            };
            m.host_file(&format!("{GUEST_BIN_DIR}/{name}"), &copy)?;
            for lib in ldd::shared_libraries(binary).map_err(HostVmError::Ldd)? {
                if !base_files.contains(lib.to_str().unwrap_or_default()) && !libs.contains(&lib) {
                    libs.push(lib);
                }
            }
        }
        add_libraries(&mut m, &libs)?;
        for (at, file) in &self.extra_files {
            m.host_file(at, file)?;
        }

        let index_root = scratch.join("index-root");
        let index = ArtefactIndex::new(&Cache::at(&index_root)?);
        for artefact in &self.files {
            let at = guest_file_path(&artefact.path, &artefact.name, &self.outside_cache_root)?;
            m.host_file(&at, &artefact.path)?;
            index.record(&Artefact {
                path: PathBuf::from(at),
                ..artefact.clone()
            })?;
        }
        for image in &self.images {
            index.record(&Artefact {
                path: PathBuf::from(image.guest_path()),
                ..image.artefact.clone()
            })?;
        }
        m.host_tree(GUEST_CACHE_DIR, &index_root)?;
        Ok(m)
    }
}

/// A copy of `binary` in `dir` without debug info, or `binary` itself if `objcopy` fails.
fn stripped(binary: &Path, dir: &Path) -> Result<PathBuf, HostVmError> {
    std::fs::create_dir_all(dir).map_err(|source| HostVmError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let out = dir.join(binary.file_name().unwrap_or_default());
    let status = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => Ok(out),
        other => {
            tracing::warn!(binary = %binary.display(), ?other, "objcopy --strip-debug failed; copying as is");
            Ok(binary.to_owned())
        }
    }
}

/// Quotes `word` for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// `/opt/roost/run/cmd`: runs the command's argv exactly (no shell parsing of the words).
pub fn command_script(argv: &[String]) -> Result<String, HostVmError> {
    if argv.is_empty() {
        return Err(HostVmError::NoCommand);
    }
    let words: Vec<String> = argv.iter().map(|w| shell_quote(w)).collect();
    Ok(format!("#!/bin/sh\nexec {}\n", words.join(" ")))
}

/// `/opt/roost/run/env`: `export` lines sourced by `/init` before the command.
pub fn env_script(env: &[(String, String)]) -> Result<String, HostVmError> {
    let mut out = String::new();
    for (name, value) in env {
        let valid = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(HostVmError::BadEnv(name.clone()));
        }
        out.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    Ok(out)
}

/// `/etc/roost/disks`: `<serial> <name>` per attached image.
pub fn disks_file(images: &[AttachedImage]) -> String {
    images
        .iter()
        .map(|i| format!("{} {}\n", i.serial, i.artefact.name))
        .collect()
}

/// Where a file artefact goes inside: the same place relative to `ROOST_CACHE_DIR` when it
/// lives in the outside cache, `/opt/roost/artefacts/<name>/<file>` otherwise.
pub fn guest_file_path(
    path: &Path,
    name: &str,
    outside_cache_root: &Path,
) -> Result<String, HostVmError> {
    let bad = || crate::cpio::CpioError::BadPath(path.display().to_string());
    let relative = match path.strip_prefix(outside_cache_root) {
        Ok(relative) => format!("{GUEST_CACHE_DIR}/{}", relative.to_str().ok_or_else(bad)?),
        Err(_) => {
            let file = path.file_name().and_then(|f| f.to_str()).ok_or_else(bad)?;
            format!("/opt/roost/artefacts/{name}/{file}")
        }
    };
    Ok(relative)
}

/// The directory holding the project's binaries: the running executable's directory, or its
/// parent when the executable is a test in `target/<profile>/deps`.
pub fn binaries_dir() -> Result<PathBuf, HostVmError> {
    let exe = std::env::current_exe().map_err(|source| HostVmError::Io {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let dir = exe.parent().map(Path::to_owned).unwrap_or_default();
    Ok(if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_owned).unwrap_or(dir)
    } else {
        dir
    })
}

/// The ELF executables directly in `dir` (not libraries, scripts or dep-info files).
pub fn project_binaries(dir: &Path) -> Result<Vec<PathBuf>, HostVmError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| HostVmError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 || name.contains('.') {
            continue;
        }
        let mut magic = [0u8; 4];
        let is_elf = std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok_and(|()| magic == *b"\x7fELF");
        if is_elf {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_words_intact() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(
            shell_quote("/opt/roost/bin/roost-bench"),
            "/opt/roost/bin/roost-bench"
        );
        assert_eq!(shell_quote("exit 7"), "'exit 7'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME;rm"), "'$HOME;rm'");
    }

    #[test]
    fn command_script_runs_argv_through_a_real_shell() {
        let argv: Vec<String> = [
            "sh",
            "-c",
            "printf '%s|' \"$0\" \"$1\"; exit 7",
            "it's",
            "a b",
        ]
        .map(String::from)
        .to_vec();
        let script = command_script(&argv).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(7));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "it's|a b|");
        assert!(matches!(command_script(&[]), Err(HostVmError::NoCommand)));
    }

    #[test]
    fn env_script_exports_quoted_values_and_rejects_bad_names() {
        let env = vec![
            ("RUST_LOG".to_owned(), "debug,x=info".to_owned()),
            ("A".into(), "it's".into()),
        ];
        assert_eq!(
            env_script(&env).unwrap(),
            "export RUST_LOG=debug,x=info\nexport A='it'\\''s'\n"
        );
        assert!(matches!(
            env_script(&[("1X".into(), String::new())]),
            Err(HostVmError::BadEnv(_))
        ));
        assert!(matches!(
            env_script(&[("A-B".into(), String::new())]),
            Err(HostVmError::BadEnv(_))
        ));
    }

    #[test]
    fn kernel_keeps_its_place_relative_to_the_cache() {
        let root = Path::new("/home/u/.cache/roost");
        assert_eq!(
            guest_file_path(&root.join("kernel/abc/vmlinux"), "kernel", root).unwrap(),
            "/opt/roost/cache/kernel/abc/vmlinux"
        );
        assert_eq!(
            guest_file_path(Path::new("/elsewhere/vmlinux"), "kernel", root).unwrap(),
            "/opt/roost/artefacts/kernel/vmlinux"
        );
    }

    fn artefact(name: &str, path: &Path) -> Artefact {
        Artefact {
            name: name.into(),
            path: path.to_owned(),
            key: "ab".repeat(32),
            size_bytes: 5,
        }
    }

    #[test]
    fn manifest_holds_command_disks_binaries_and_relocated_index() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("cache");
        let vmlinux = outside.join("kernel/k1/vmlinux");
        std::fs::create_dir_all(vmlinux.parent().unwrap()).unwrap();
        std::fs::write(&vmlinux, "kernel").unwrap();
        let image = dir.path().join("base.ext4");
        std::fs::write(&image, "image").unwrap();
        let overlay = Overlay {
            command: vec!["true".into()],
            env: vec![],
            binaries: vec![PathBuf::from("/bin/busybox")],
            files: vec![artefact("kernel", &vmlinux)],
            images: vec![AttachedImage {
                artefact: artefact("rootfs-base", &image),
                serial: "roost0".into(),
            }],
            outside_cache_root: outside.clone(),
            extra_files: vec![("/opt/test/hello".into(), image.clone())],
            strip_debug: true,
        };
        let scratch = tempfile::tempdir().unwrap();
        let m = overlay.manifest(scratch.path(), &HashSet::new()).unwrap();
        for path in [
            "/opt/roost/run/cmd",
            "/opt/roost/run/env",
            "/etc/roost/disks",
            "/opt/roost/bin/busybox",
            "/opt/roost/cache/kernel/k1/vmlinux",
            "/opt/test/hello",
        ] {
            assert!(m.contains(path), "{path} missing");
        }
        assert_eq!(disks_file(&overlay.images), "roost0 rootfs-base\n");

        // The records read back through the index API, with in-VM paths.
        let inside = ArtefactIndex::new(&Cache::at(scratch.path().join("index-root")).unwrap());
        let err = inside.lookup("rootfs-base").unwrap_err();
        assert!(err.to_string().contains("/dev/roost/rootfs-base"), "{err}");
        let err = inside.lookup("kernel").unwrap_err();
        assert!(
            err.to_string()
                .contains("/opt/roost/cache/kernel/k1/vmlinux"),
            "{err}"
        );
        let listing = m.listing();
        assert!(
            listing.contains("file /opt/roost/cache/index/kernel.json"),
            "{listing}"
        );
        assert!(
            listing.contains("file /opt/roost/cache/index/rootfs-base.json"),
            "{listing}"
        );
    }

    #[test]
    fn finds_only_elf_executables() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exec = |name: &str, contents: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        exec("roost", b"\x7fELF....");
        exec("roost-agent", b"\x7fELF....");
        exec("script", b"#!/bin/sh\n");
        exec("libroost.so", b"\x7fELF....");
        std::fs::write(dir.path().join("data"), b"\x7fELF").unwrap();
        std::fs::create_dir(dir.path().join("deps")).unwrap();
        let names: Vec<_> = project_binaries(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["roost", "roost-agent"]);
    }
}
