//! The pseudo filesystems every guest needs. Each is mounted only if its mount point is not
//! already a mount (the kernel may have mounted devtmpfs on /dev). Writable places (/tmp,
//! /run, /dev/shm) are tmpfs, so a read-only root filesystem works.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

/// One pseudo filesystem to mount.
#[derive(Debug, Clone, Copy)]
struct Spec {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// In mount order: /proc first (to read mountinfo), /dev before what lives in it.
const SPECS: &[Spec] = &[
    Spec {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Spec {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Spec {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Spec {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    Spec {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    Spec {
        fstype: "tmpfs",
        target: "/run",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    Spec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    Spec {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Symlinks expected in /dev that devtmpfs does not create.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
];

/// A step that failed; init reports it and carries on (PID 1 must not give up).
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {target}")]
    MountPoint {
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot create {path}")]
    Extra {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Mounts everything in [`SPECS`] that is not mounted yet and adds the /dev links and
/// /run/lock. Returns the steps that failed.
pub fn mount_all() -> Vec<MountError> {
    let mut errors = Vec::new();
    for spec in SPECS {
        if is_mount_point(spec.target) {
            continue;
        }
        if let Err(source) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(spec.target)
        {
            errors.push(MountError::MountPoint {
                target: spec.target,
                source,
            });
            continue;
        }
        if let Err(source) = mount(
            Some(spec.fstype),
            spec.target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        ) {
            errors.push(MountError::Mount {
                fstype: spec.fstype,
                target: spec.target,
                source,
            });
        }
    }
    for (path, target) in DEV_LINKS {
        if fs::symlink_metadata(path).is_err()
            && let Err(source) = symlink(target, path)
        {
            errors.push(MountError::Extra { path, source });
        }
    }
    // Debian's /var/lock points here.
    let lock = "/run/lock";
    let made = fs::create_dir_all(lock)
        .and_then(|()| fs::set_permissions(lock, fs::Permissions::from_mode(0o1777)));
    if let Err(source) = made {
        errors.push(MountError::Extra { path: lock, source });
    }
    errors
}

/// Whether `target` is a mount point, per /proc/self/mountinfo (false before /proc is up).
fn is_mount_point(target: &str) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mount_points(&info).any(|point| Path::new(&point) == Path::new(target))
}

/// The mount points listed in a mountinfo text (field 5, octal escapes decoded).
fn mount_points(info: &str) -> impl Iterator<Item = String> + '_ {
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|digits| {
                std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| u8::from_str_radix(d, 8).ok())
            });
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_mount_points_are_decoded() {
        let info = "22 1 254:0 / / ro,relatime shared:1 - ext4 /dev/vda ro\n\
                    23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw\n\
                    30 22 0:30 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        let points: Vec<_> = mount_points(info).collect();
        assert_eq!(points, ["/", "/dev", "/mnt/with space"]);
    }

    #[test]
    fn specs_mount_parents_first() {
        for (i, spec) in SPECS.iter().enumerate() {
            for later in &SPECS[i + 1..] {
                assert!(
                    !Path::new(spec.target).starts_with(later.target),
                    "{} is mounted before its parent {}",
                    spec.target,
                    later.target
                );
            }
        }
    }
}
