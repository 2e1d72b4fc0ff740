//! The host VM's initramfs: a cached base archive (busybox, `/init`, the kernel modules, and
//! QEMU with its libraries and firmware so nested guests can run under `-accel kvm`) plus a
//! small per-run archive appended to it (the project's binaries, the command, the artefact
//! index; see [`crate::overlay`]).
//!
//! Cache entry layout (`<cache>/hostvm-initramfs/<key>/`): `initramfs.cpio` and `listing.txt`
//! (one `<kind> <path>` line per entry, so the per-run archive can skip files the base has).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use roost_images::{Cache, CacheKeyBuilder, Origin, Progress};

use crate::HostVmError;
use crate::cpio::{Entry, Manifest};
use crate::kernel::HostKernel;
use crate::{ldd, modules, protocol};

/// Bumped whenever what goes into the base archive changes in a way its inputs do not show.
const RECIPE: &str = "hostvm-initramfs-2";

/// The host's busybox (Debian's `busybox-static`).
const BUSYBOX: &str = "/bin/busybox";

/// QEMU, for nested guests inside the host VM.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// Where QEMU looks for firmware (`qemu-system-x86_64 -L help`).
const FIRMWARE_DIRS: &[&str] = &[
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];

/// Firmware for `-M microvm` and for `-M pc` with `-kernel`: (file, required).
const FIRMWARE: &[(&str, bool)] = &[
    ("bios-microvm.bin", true),
    ("qboot.rom", false),
    ("bios-256k.bin", true),
    ("bios.bin", false),
    ("linuxboot_dma.bin", true),
    ("linuxboot.bin", false),
    ("kvmvapic.bin", true),
    ("pvh.bin", false),
    ("multiboot_dma.bin", false),
    ("efi-virtio.rom", false),
];

/// The `/init` script, with its placeholders filled.
pub fn init_script() -> String {
    include_str!("init.sh")
        .replace("@EARLY_MODULES@", &modules::EARLY.join(" "))
        .replace("@MODULES@", &modules::EAGER.join(" "))
        .replace("@CONTROL_PORT@", protocol::CONTROL_PORT)
        .replace("@HEARTBEAT_SECS@", &protocol::HEARTBEAT_SECS.to_string())
        .replace("@STDOUT_PORT@", protocol::STDOUT_PORT)
        .replace("@STDERR_PORT@", protocol::STDERR_PORT)
}

/// A built base archive.
#[derive(Debug, Clone)]
pub struct BaseInitramfs {
    pub cpio: PathBuf,
    /// Paths of the regular files and symlinks in the archive.
    pub files: HashSet<String>,
    pub origin: Origin,
}

impl BaseInitramfs {
    /// Returns the cached base archive for `kernel` and this machine's busybox and QEMU,
    /// building it if needed.
    pub fn ensure(
        cache: &Cache,
        kernel: &HostKernel,
        progress: &Progress,
    ) -> Result<Self, HostVmError> {
        let qemu_libs = ldd::shared_libraries(Path::new(QEMU)).map_err(HostVmError::Ldd)?;
        let firmware = find_firmware()?;
        let init = init_script();
        let mut key = CacheKeyBuilder::new("hostvm-initramfs");
        key.add("recipe", RECIPE.as_bytes())
            .add("kernel", kernel.key.as_bytes())
            .add("init", init.as_bytes());
        for path in [Path::new(BUSYBOX), Path::new(QEMU)]
            .into_iter()
            .chain(qemu_libs.iter().map(PathBuf::as_path))
            .chain(firmware.iter().map(|(_, p)| p.as_path()))
        {
            key.add("file", stat_fingerprint(path)?.as_bytes());
        }
        let key = key.finish();
        let entry = cache.entry("hostvm-initramfs", &key);
        let (dir, origin) = entry.get_or_build(|staging| {
            let task = progress.task("host VM initramfs");
            task.phase("collecting busybox, modules and QEMU");
            let manifest = base_manifest(kernel, &init, &qemu_libs, &firmware)?;
            let size = manifest.write_to_file(&staging.join("initramfs.cpio"))?;
            std::fs::write(staging.join("listing.txt"), manifest.listing()).map_err(|source| {
                HostVmError::Io {
                    path: staging.join("listing.txt"),
                    source,
                }
            })?;
            task.finish(&format!("{} MiB", size >> 20));
            Ok::<_, HostVmError>(())
        })?;
        let listing_path = dir.join("listing.txt");
        let listing = std::fs::read_to_string(&listing_path).map_err(|source| HostVmError::Io {
            path: listing_path,
            source,
        })?;
        let files = listing
            .lines()
            .filter_map(|line| line.split_once(' '))
            .filter(|(kind, _)| *kind != "dir")
            .map(|(_, path)| path.to_owned())
            .collect();
        Ok(Self {
            cpio: dir.join("initramfs.cpio"),
            files,
            origin,
        })
    }
}

/// Path, size, modification time and inode: enough to notice a package upgrade without hashing
/// tens of megabytes on every run.
fn stat_fingerprint(path: &Path) -> Result<String, HostVmError> {
    let meta = std::fs::metadata(path).map_err(|source| HostVmError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(format!(
        "{} {} {} {}",
        path.display(),
        meta.size(),
        meta.mtime(),
        meta.ino()
    ))
}

fn find_firmware() -> Result<Vec<(String, PathBuf)>, HostVmError> {
    let mut found = Vec::new();
    for (name, required) in FIRMWARE {
        match FIRMWARE_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists())
        {
            Some(path) => found.push(((*name).to_owned(), path)),
            None if *required => {
                return Err(HostVmError::MissingHostFile {
                    path: PathBuf::from(FIRMWARE_DIRS[0]).join(name),
                    hint: "QEMU firmware for nested guests; apt-get install qemu-system-x86",
                });
            }
            None => {}
        }
    }
    Ok(found)
}

/// Busybox applet paths (`bin/sh`, `usr/bin/awk`, ...).
fn busybox_applets() -> Result<Vec<String>, HostVmError> {
    let output = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .map_err(|_| HostVmError::MissingHostFile {
            path: BUSYBOX.into(),
            hint: "apt-get install busybox-static",
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn base_manifest(
    kernel: &HostKernel,
    init: &str,
    qemu_libs: &[PathBuf],
    firmware: &[(String, PathBuf)],
) -> Result<Manifest, HostVmError> {
    let mut m = Manifest::new();
    for (dir, mode) in [
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/dev", 0o755),
        ("/tmp", 0o1777),
        ("/var/tmp", 0o1777),
        ("/run", 0o755),
        ("/root", 0o700),
        ("/mnt", 0o755),
        ("/opt/roost/bin", 0o755),
        ("/opt/roost/cache", 0o755),
    ] {
        m.dir(dir, mode)?;
    }
    m.insert(
        "/dev/console",
        Entry::CharDevice {
            major: 5,
            minor: 1,
            mode: 0o600,
        },
    )?;
    if !Path::new(BUSYBOX).exists() {
        return Err(HostVmError::MissingHostFile {
            path: BUSYBOX.into(),
            hint: "apt-get install busybox-static",
        });
    }
    m.host_file("/bin/busybox", Path::new(BUSYBOX))?;
    for applet in busybox_applets()? {
        let path = format!("/{applet}");
        if path != "/bin/busybox" {
            m.symlink(&path, "/bin/busybox")?;
        }
    }
    m.bytes("/init", init, 0o755)?;
    m.bytes("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    m.bytes("/etc/group", "root:x:0:\nkvm:x:100:\n", 0o644)?;
    m.bytes("/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644)?;
    m.bytes("/etc/resolv.conf", "nameserver 10.0.2.3\n", 0o644)?;
    m.host_tree(
        &format!("/lib/modules/{}", kernel.release),
        &kernel.modules_dir(),
    )?;

    if !Path::new(QEMU).exists() {
        return Err(HostVmError::MissingHostFile {
            path: QEMU.into(),
            hint: "apt-get install qemu-system-x86",
        });
    }
    m.host_file(QEMU, Path::new(QEMU))?;
    add_libraries(&mut m, qemu_libs)?;
    for (name, path) in firmware {
        m.host_file(&format!("/usr/share/qemu/{name}"), path)?;
    }
    Ok(m)
}

/// Adds shared libraries at the paths `ldd` reported, contents of symlinks resolved.
pub fn add_libraries(m: &mut Manifest, libs: &[PathBuf]) -> Result<(), HostVmError> {
    for lib in libs {
        let at = lib
            .to_str()
            .ok_or_else(|| crate::cpio::CpioError::BadPath(lib.display().to_string()))?;
        m.host_file(at, lib)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_script_has_no_unfilled_placeholders() {
        let init = init_script();
        assert!(!init.contains('@'), "placeholder left in /init");
        assert!(init.starts_with("#!/bin/busybox sh\n"));
        assert!(init.contains("modprobe -a virtio_pci virtio_console"));
        assert!(init.contains("kvm_amd"));
        assert!(init.contains(protocol::CONTROL_PORT));
    }

    #[test]
    fn init_script_is_valid_shell() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init");
        std::fs::write(&path, init_script()).unwrap();
        let status = Command::new("sh").arg("-n").arg(&path).status().unwrap();
        assert!(status.success(), "sh -n rejected /init");
    }

    #[test]
    fn base_manifest_has_busybox_init_modules_and_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("root/lib/modules/6.1.0-test");
        std::fs::create_dir_all(modules.join("kernel/arch/x86/kvm")).unwrap();
        std::fs::write(modules.join("kernel/arch/x86/kvm/kvm-amd.ko"), "ko").unwrap();
        std::fs::write(modules.join("modules.dep"), "").unwrap();
        let kernel = HostKernel {
            package: "p".into(),
            version: "v".into(),
            release: "6.1.0-test".into(),
            vmlinuz: dir.path().join("vmlinuz"),
            boot_image: dir.path().join("vmlinuz"),
            modules_root: dir.path().join("root"),
            key: "k".into(),
            origin: Origin::Built,
        };
        let libs = ldd::shared_libraries(Path::new(QEMU)).unwrap();
        let firmware = find_firmware().unwrap();
        let m = base_manifest(&kernel, &init_script(), &libs, &firmware).unwrap();
        for path in [
            "/init",
            "/bin/busybox",
            "/bin/sh",
            "/sbin/modprobe",
            "/dev/console",
            "/lib/modules/6.1.0-test/kernel/arch/x86/kvm/kvm-amd.ko",
            "/lib/modules/6.1.0-test/modules.dep",
            QEMU,
            "/usr/share/qemu/bios-microvm.bin",
            "/usr/share/qemu/bios-256k.bin",
            "/lib64/ld-linux-x86-64.so.2",
            "/tmp",
        ] {
            assert!(m.contains(path), "{path} missing from the base initramfs");
        }
        assert!(libs.iter().all(|l| m.contains(l.to_str().unwrap())));
    }
}
