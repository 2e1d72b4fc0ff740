//! What a jail holds: its directory, the unprivileged identity, the files and device nodes
//! made visible inside, and the program to run. Checked before any namespace is made, so bad
//! input fails with a message instead of half a jail.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use super::JailError;

/// A host file or directory made visible inside the jail by a bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailMount {
    /// Absolute host path.
    pub host: PathBuf,
    /// Absolute path inside the jail.
    pub inside: PathBuf,
    /// Mounted read-only (kernels, base images, the binary and its libraries).
    pub read_only: bool,
}

impl JailMount {
    /// Parses `HOST[:INSIDE][:ro|:rw]` (INSIDE defaults to HOST; read-only by default).
    pub fn parse(text: &str) -> Result<Self, JailError> {
        let mut parts: Vec<&str> = text.split(':').collect();
        let mut read_only = true;
        if let Some(last) = parts.last().copied()
            && parts.len() > 1
            && (last == "ro" || last == "rw")
        {
            read_only = last == "ro";
            parts.pop();
        }
        let (host, inside) = match parts.as_slice() {
            [host] => (*host, *host),
            [host, inside] => (*host, *inside),
            _ => return Err(JailError::BadMount(text.to_string())),
        };
        Ok(Self {
            host: PathBuf::from(host),
            inside: PathBuf::from(inside),
            read_only,
        })
    }
}

/// Everything needed to start a program in a jail.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The jail's directory on the host; created by the jailer (it must not exist yet) and
    /// removed when the program ends.
    pub root: PathBuf,
    /// The unprivileged identity the program runs as.
    pub uid: u32,
    pub gid: u32,
    /// A network namespace to join (e.g. `/run/netns/roost-<id>`); `None` gives the program a
    /// new, empty one (loopback only).
    pub netns: Option<PathBuf>,
    /// A tap device in the jail's network namespace to open before privileges are dropped and
    /// hand to the program as fd [`super::TAP_FD`] (`roost vm run --net-tap-fd 3`): the jailed
    /// uid could not attach to it itself (that needs CAP_NET_ADMIN), and `/dev/net/tun` need not
    /// be inside.
    pub tap: Option<String>,
    /// The UTS namespace's host name.
    pub hostname: String,
    pub mounts: Vec<JailMount>,
    /// Character devices recreated inside (same numbers), owned by `uid`, mode 0600.
    pub devices: Vec<PathBuf>,
    /// Directories created inside, owned by `uid` (sockets, logs, memory files).
    pub writable_dirs: Vec<PathBuf>,
    /// The program's path inside the jail, and its arguments (argv[1..]).
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Environment of the program (nothing else is inherited).
    pub env: Vec<(OsString, OsString)>,
}

impl JailSpec {
    /// Refuses what cannot make a sound jail: relative or escaping paths, root as the
    /// identity, missing host files, a root directory that already exists.
    pub fn validate(&self) -> Result<(), JailError> {
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::PrivilegedIdentity);
        }
        absolute_clean(&self.root, "jail root")?;
        if self.root == Path::new("/") {
            return Err(JailError::BadPath {
                what: "jail root",
                path: self.root.clone(),
            });
        }
        if self.root.exists() {
            return Err(JailError::RootExists(self.root.clone()));
        }
        for mount in &self.mounts {
            absolute_clean(&mount.host, "mount source")?;
            absolute_clean(&mount.inside, "mount target")?;
            if !mount.host.exists() {
                return Err(JailError::MissingHostPath(mount.host.clone()));
            }
        }
        for device in &self.devices {
            absolute_clean(device, "device")?;
            if !device.starts_with("/dev") {
                return Err(JailError::BadPath {
                    what: "device (must be under /dev)",
                    path: device.clone(),
                });
            }
        }
        for dir in &self.writable_dirs {
            absolute_clean(dir, "writable directory")?;
        }
        absolute_clean(&self.program, "program")?;
        if let Some(tap) = &self.tap
            && (tap.is_empty() || tap.len() > 15 || tap.contains(['/', '\0']))
        {
            return Err(JailError::BadTap(tap.clone()));
        }
        if let Some(netns) = &self.netns
            && !netns.exists()
        {
            return Err(JailError::MissingHostPath(netns.clone()));
        }
        Ok(())
    }

    /// `inside` (an absolute jail path) as a host path below the root.
    pub fn host_path(&self, inside: &Path) -> PathBuf {
        self.root.join(inside.strip_prefix("/").unwrap_or(inside))
    }
}

/// An absolute path without `..`, `.` or empty components.
fn absolute_clean(path: &Path, what: &'static str) -> Result<(), JailError> {
    let clean = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if clean {
        Ok(())
    } else {
        Err(JailError::BadPath {
            what,
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(root: &Path) -> JailSpec {
        JailSpec {
            root: root.join("jail"),
            uid: 1000,
            gid: 1000,
            netns: None,
            tap: None,
            hostname: "vmm".into(),
            mounts: vec![JailMount::parse("/etc/hostname:/hostname:ro").unwrap()],
            devices: vec![PathBuf::from("/dev/null")],
            writable_dirs: vec![PathBuf::from("/run")],
            program: PathBuf::from("/bin/true"),
            args: vec![],
            env: vec![],
        }
    }

    #[test]
    fn mount_specs_parse_with_defaults() {
        assert_eq!(
            JailMount::parse("/a/kernel").unwrap(),
            JailMount {
                host: "/a/kernel".into(),
                inside: "/a/kernel".into(),
                read_only: true
            }
        );
        let rw = JailMount::parse("/srv/x:/x:rw").unwrap();
        assert!(!rw.read_only);
        assert_eq!(rw.inside, PathBuf::from("/x"));
        assert!(JailMount::parse("/a:/b:/c").is_err());
    }

    #[test]
    fn a_sound_spec_passes() {
        let dir = tempfile::tempdir().unwrap();
        spec(dir.path()).validate().unwrap();
    }

    #[test]
    fn unsound_specs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root_user = JailSpec {
            uid: 0,
            ..spec(dir.path())
        };
        assert!(matches!(
            root_user.validate(),
            Err(JailError::PrivilegedIdentity)
        ));
        let escaping = JailSpec {
            mounts: vec![JailMount::parse("/etc/hostname:/../etc/x").unwrap()],
            ..spec(dir.path())
        };
        assert!(matches!(
            escaping.validate(),
            Err(JailError::BadPath { .. })
        ));
        let missing = JailSpec {
            mounts: vec![JailMount::parse("/nonexistent/kernel:/k").unwrap()],
            ..spec(dir.path())
        };
        assert!(matches!(
            missing.validate(),
            Err(JailError::MissingHostPath(_))
        ));
        let existing = JailSpec {
            root: dir.path().to_path_buf(),
            ..spec(dir.path())
        };
        assert!(matches!(existing.validate(), Err(JailError::RootExists(_))));
        let bad_device = JailSpec {
            devices: vec![PathBuf::from("/etc/passwd")],
            ..spec(dir.path())
        };
        assert!(bad_device.validate().is_err());
        let bad_tap = JailSpec {
            tap: Some("a-name-far-too-long".into()),
            ..spec(dir.path())
        };
        assert!(matches!(bad_tap.validate(), Err(JailError::BadTap(_))));
    }

    #[test]
    fn inside_paths_map_below_the_root() {
        let s = spec(Path::new("/srv"));
        assert_eq!(
            s.host_path(Path::new("/run/v.sock")),
            PathBuf::from("/srv/jail/run/v.sock")
        );
    }
}
