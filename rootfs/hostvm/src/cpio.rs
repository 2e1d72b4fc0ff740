//! Initramfs archives: a [`Manifest`] of entries and a writer for the `newc` cpio format that
//! Linux unpacks at boot.
//!
//! The kernel accepts several archives concatenated into one initrd, later entries replacing
//! earlier ones, which is how a cached base archive and a small per-run archive combine.
//! Entries are written sorted by path with every ancestor directory first, because the kernel
//! does not create missing parents. Archives are uncompressed: under TCG, decompressing in
//! the guest costs far more than QEMU copying a few more megabytes into guest memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cannot read {path} for the initramfs")]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the initramfs {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("initramfs path `{0}` must be absolute, normalised and valid UTF-8")]
    BadPath(String),
    #[error("{path} is too large for a cpio archive ({size} bytes)")]
    TooLarge { path: String, size: u64 },
}

/// Where a regular file's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// Read from this file on the host when the archive is written (symlinks followed).
    Host(PathBuf),
    /// These bytes.
    Bytes(Vec<u8>),
}

/// One archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { contents: Contents, mode: u32 },
    Symlink { target: String },
    CharDevice { major: u32, minor: u32, mode: u32 },
}

/// The entries of one archive, keyed by absolute in-guest path (`/bin/busybox`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: BTreeMap<String, Entry>,
}

impl Manifest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `entry` at `path`, replacing an earlier entry there, and adds missing ancestors as
    /// directories (mode 0755).
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        let path = normalise(path)?;
        for (slash, _) in path.match_indices('/').skip(1) {
            let ancestor = &path[..slash];
            if !self.entries.contains_key(ancestor) {
                self.entries
                    .insert(ancestor.to_owned(), Entry::Dir { mode: 0o755 });
            }
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.insert(path, Entry::Dir { mode })
    }

    /// Adds a host file, keeping its permission bits.
    pub fn host_file(&mut self, path: &str, source: &Path) -> Result<(), CpioError> {
        let meta = std::fs::metadata(source).map_err(|e| CpioError::Source {
            path: source.to_owned(),
            source: e,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        self.insert(
            path,
            Entry::File {
                contents: Contents::Host(source.to_owned()),
                mode,
            },
        )
    }

    /// Adds a file with the given contents.
    pub fn bytes(
        &mut self,
        path: &str,
        contents: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<(), CpioError> {
        self.insert(
            path,
            Entry::File {
                contents: Contents::Bytes(contents.into()),
                mode,
            },
        )
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.insert(
            path,
            Entry::Symlink {
                target: target.to_owned(),
            },
        )
    }

    /// Adds every file, directory and symlink under the host directory `root` at `prefix`.
    pub fn host_tree(&mut self, prefix: &str, root: &Path) -> Result<(), CpioError> {
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CpioError::Source { path, source }
        };
        let mut stack = vec![(root.to_owned(), normalise(prefix)?)];
        while let Some((dir, at)) = stack.pop() {
            let meta = std::fs::metadata(&dir).map_err(read_err(&dir))?;
            self.dir(&at, meta.permissions().mode() & 0o7777)?;
            for item in std::fs::read_dir(&dir).map_err(read_err(&dir))? {
                let item = item.map_err(read_err(&dir))?;
                let path = item.path();
                let name = item.file_name();
                let name = name
                    .to_str()
                    .ok_or_else(|| CpioError::BadPath(path.display().to_string()))?;
                let child = format!("{}/{name}", at.trim_end_matches('/'));
                let kind = item.file_type().map_err(read_err(&path))?;
                if kind.is_dir() {
                    stack.push((path, child));
                } else if kind.is_symlink() {
                    let target = std::fs::read_link(&path).map_err(read_err(&path))?;
                    let target = target
                        .to_str()
                        .ok_or_else(|| CpioError::BadPath(path.display().to_string()))?;
                    self.symlink(&child, target)?;
                } else {
                    self.host_file(&child, &path)?;
                }
            }
        }
        Ok(())
    }

    /// Whether an entry exists at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }

    /// The entries in archive order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries
            .iter()
            .map(|(path, entry)| (path.as_str(), entry))
    }

    /// One line per entry (`<kind> <path>`), for inspection and for cache records.
    pub fn listing(&self) -> String {
        let mut out = String::new();
        for (path, entry) in self.iter() {
            let kind = match entry {
                Entry::Dir { .. } => "dir",
                Entry::File { .. } => "file",
                Entry::Symlink { .. } => "symlink",
                Entry::CharDevice { .. } => "chardev",
            };
            out.push_str(kind);
            out.push(' ');
            out.push_str(path);
            out.push('\n');
        }
        out
    }

    /// Writes the archive to `out` (a new file).
    pub fn write_to_file(&self, out: &Path) -> Result<u64, CpioError> {
        let write_err = |source| CpioError::Write {
            path: out.to_owned(),
            source,
        };
        let file = File::create(out).map_err(write_err)?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        let written = self.write(&mut writer)?;
        writer.flush().map_err(write_err)?;
        Ok(written)
    }

    /// Writes the archive in `newc` format, returning the number of bytes written.
    pub fn write(&self, out: &mut impl Write) -> Result<u64, CpioError> {
        let mut w = CountingWriter {
            inner: out,
            written: 0,
        };
        let write_err = |source| CpioError::Write {
            path: PathBuf::from("<initramfs>"),
            source,
        };
        for (ino, (path, entry)) in (1u32..).zip(self.iter()) {
            let name = path.trim_start_matches('/');
            let name = if name.is_empty() { "." } else { name };
            match entry {
                Entry::Dir { mode } => {
                    header(&mut w, ino, 0o040000 | mode, 2, 0, (0, 0), name).map_err(write_err)?;
                }
                Entry::Symlink { target } => {
                    let size = u32::try_from(target.len()).map_err(|_| CpioError::TooLarge {
                        path: path.to_owned(),
                        size: target.len() as u64,
                    })?;
                    header(&mut w, ino, 0o120777, 1, size, (0, 0), name).map_err(write_err)?;
                    w.write_all(target.as_bytes()).map_err(write_err)?;
                    pad(&mut w).map_err(write_err)?;
                }
                Entry::CharDevice { major, minor, mode } => {
                    header(&mut w, ino, 0o020000 | mode, 1, 0, (*major, *minor), name)
                        .map_err(write_err)?;
                }
                Entry::File { contents, mode } => match contents {
                    Contents::Bytes(bytes) => {
                        let size = u32::try_from(bytes.len()).map_err(|_| CpioError::TooLarge {
                            path: path.to_owned(),
                            size: bytes.len() as u64,
                        })?;
                        header(&mut w, ino, 0o100000 | mode, 1, size, (0, 0), name)
                            .map_err(write_err)?;
                        w.write_all(bytes).map_err(write_err)?;
                        pad(&mut w).map_err(write_err)?;
                    }
                    Contents::Host(source) => {
                        let read_err = |e| CpioError::Source {
                            path: source.clone(),
                            source: e,
                        };
                        let mut file = File::open(source).map_err(read_err)?;
                        let len = file.metadata().map_err(read_err)?.size();
                        let size = u32::try_from(len).map_err(|_| CpioError::TooLarge {
                            path: path.to_owned(),
                            size: len,
                        })?;
                        header(&mut w, ino, 0o100000 | mode, 1, size, (0, 0), name)
                            .map_err(write_err)?;
                        let copied = io::copy(&mut file, &mut w).map_err(read_err)?;
                        if copied != len {
                            return Err(read_err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "file changed size while being archived",
                            )));
                        }
                        pad(&mut w).map_err(write_err)?;
                    }
                },
            }
        }
        header(&mut w, 0, 0, 1, 0, (0, 0), "TRAILER!!!").map_err(write_err)?;
        Ok(w.written)
    }
}

fn normalise(path: &str) -> Result<String, CpioError> {
    let bad = || CpioError::BadPath(path.to_owned());
    if !path.starts_with('/') || path.split('/').any(|p| p == "." || p == "..") {
        return Err(bad());
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    Ok(format!("/{}", parts.join("/")))
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> CountingWriter<'_, W> {
    fn pad_len(&self) -> usize {
        // newc pads the header+name and the data each to a multiple of 4 bytes.
        ((4 - (self.written % 4)) % 4) as usize
    }
}

fn pad<W: Write>(w: &mut CountingWriter<'_, W>) -> io::Result<()> {
    let n = w.pad_len();
    w.write_all(&[0u8; 3][..n])
}

fn header<W: Write>(
    w: &mut CountingWriter<'_, W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    (rdev_major, rdev_minor): (u32, u32),
    name: &str,
) -> io::Result<()> {
    let name_size = name.len() + 1;
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor,
    ];
    let mut text = String::with_capacity(110);
    text.push_str("070701");
    for field in fields {
        text.push_str(&format!("{field:08x}"));
    }
    text.push_str(&format!("{name_size:08x}{:08x}", 0));
    w.write_all(text.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_adds_ancestors_in_order() {
        let mut m = Manifest::new();
        m.bytes("/opt/roost/run/cmd", "x", 0o755).unwrap();
        m.symlink("/bin/sh", "busybox").unwrap();
        assert_eq!(
            m.listing(),
            "dir /bin\nsymlink /bin/sh\ndir /opt\ndir /opt/roost\ndir /opt/roost/run\nfile /opt/roost/run/cmd\n"
        );
    }

    #[test]
    fn rejects_relative_and_dotted_paths() {
        let mut m = Manifest::new();
        assert!(matches!(m.dir("etc", 0o755), Err(CpioError::BadPath(_))));
        assert!(matches!(
            m.dir("/etc/../x", 0o755),
            Err(CpioError::BadPath(_))
        ));
        m.dir("/etc//roost/", 0o755).unwrap();
        assert!(m.contains("/etc/roost"));
    }

    #[test]
    fn later_entries_replace_earlier_ones_but_keep_explicit_dirs() {
        let mut m = Manifest::new();
        m.dir("/root", 0o700).unwrap();
        m.bytes("/root/a", "1", 0o644).unwrap();
        m.bytes("/root/a", "2", 0o600).unwrap();
        let entries: Vec<_> = m.iter().collect();
        assert_eq!(entries[0], ("/root", &Entry::Dir { mode: 0o700 }));
        assert_eq!(
            entries[1],
            (
                "/root/a",
                &Entry::File {
                    contents: Contents::Bytes(b"2".to_vec()),
                    mode: 0o600
                }
            )
        );
    }

    /// One parsed archive member: (name, mode, rdev, data).
    type Member = (String, u32, (u32, u32), Vec<u8>);

    /// Parses a newc archive back into its members.
    fn parse(mut bytes: &[u8]) -> Vec<Member> {
        let mut out = Vec::new();
        let total = bytes.len();
        loop {
            let offset = total - bytes.len();
            assert_eq!(offset % 4, 0, "header misaligned at {offset}");
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8]).unwrap(),
                    16,
                )
                .unwrap()
            };
            let (mode, size, rdev, namesize) =
                (field(1), field(6), (field(9), field(10)), field(11));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&bytes[110..name_end - 1])
                .unwrap()
                .to_owned();
            assert_eq!(bytes[name_end - 1], 0);
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + size as usize;
            let data = bytes[data_start..data_end].to_vec();
            bytes = &bytes[data_end.next_multiple_of(4).min(bytes.len())..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn newc_output_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("hello");
        std::fs::write(&host, "hello world").unwrap();
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o750)).unwrap();
        let mut m = Manifest::new();
        m.host_file("/usr/bin/hello", &host).unwrap();
        m.symlink("/bin/sh", "/bin/busybox").unwrap();
        m.insert(
            "/dev/console",
            Entry::CharDevice {
                major: 5,
                minor: 1,
                mode: 0o600,
            },
        )
        .unwrap();
        m.bytes("/init", "#!/bin/sh\n", 0o755).unwrap();
        let mut buf = Vec::new();
        let written = m.write(&mut buf).unwrap();
        assert_eq!(written, buf.len() as u64);
        let parsed = parse(&buf);
        let names: Vec<_> = parsed.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "usr",
                "usr/bin",
                "usr/bin/hello"
            ]
        );
        assert_eq!(parsed[1].1, 0o120777);
        assert_eq!(parsed[1].3, b"/bin/busybox");
        assert_eq!(parsed[3].1, 0o020600);
        assert_eq!(parsed[3].2, (5, 1));
        assert_eq!(parsed[4].1, 0o100755);
        assert_eq!(parsed[7].1, 0o100750);
        assert_eq!(parsed[7].3, b"hello world");
    }

    #[test]
    fn cpio_tool_reads_our_archives() {
        let mut m = Manifest::new();
        m.bytes("/etc/roost/disks", "roost0 rootfs-base\n", 0o644)
            .unwrap();
        m.symlink("/bin/sh", "busybox").unwrap();
        let mut buf = Vec::new();
        m.write(&mut buf).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the cpio tool is needed for this test (apt-get install cpio)");
        child.stdin.take().unwrap().write_all(&buf).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "bin\nbin/sh\netc\netc/roost\netc/roost/disks\n"
        );
    }

    #[test]
    fn host_tree_copies_structure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kernel/net")).unwrap();
        std::fs::write(dir.path().join("kernel/net/tun.ko"), "ko").unwrap();
        std::os::unix::fs::symlink("kernel", dir.path().join("link")).unwrap();
        let mut m = Manifest::new();
        m.host_tree("/lib/modules/v", dir.path()).unwrap();
        assert!(m.contains("/lib/modules/v/kernel/net/tun.ko"));
        assert!(matches!(
            m.iter().find(|(p, _)| *p == "/lib/modules/v/link").unwrap().1,
            Entry::Symlink { target } if target == "kernel"
        ));
    }
}
