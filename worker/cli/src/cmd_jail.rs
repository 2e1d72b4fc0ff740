//! `roost jail`: runs a program (normally `roost vm run`) in an empty room — new PID, mount,
//! IPC, UTS and network namespaces, a directory holding only what it needs, an unprivileged
//! uid/gid without capabilities — and removes that directory when it ends. The worker starts
//! VMMs through it; it is also usable by hand to inspect a jail. See `docs/threat-model.md`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use roost_worker::jail::{self, JailMount, JailSpec};

#[derive(clap::Subcommand, Debug)]
pub enum JailCommand {
    /// Run PROGRAM (a path inside the jail) jailed; exits with its status.
    Run(Box<JailRunArgs>),
    /// Remove jail directories left under BASE by jailers that were killed.
    Clean {
        /// The directory holding jail directories (e.g. /srv/roost/jail).
        #[arg(long, value_name = "DIR")]
        base: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct JailRunArgs {
    /// The jail directory to create (must not exist); removed when the program ends.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Unprivileged uid the program runs as.
    #[arg(long)]
    uid: u32,
    /// Unprivileged gid the program runs as.
    #[arg(long)]
    gid: u32,
    /// Join this network namespace (e.g. /run/netns/roost-<id>); default: a new empty one.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Open this tap of the jail's network namespace before dropping privileges and give it
    /// to the program as fd 3 (for `roost vm run --net-tap-fd 3`).
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// Host name inside the jail.
    #[arg(long, default_value = "roost-vmm")]
    hostname: String,
    /// HOST[:INSIDE][:ro|:rw] bind mounts (read-only unless `:rw`), repeatable.
    #[arg(long = "mount", value_name = "SPEC")]
    mounts: Vec<String>,
    /// A host binary to make available at the same path, with its shared libraries
    /// (read-only), repeatable.
    #[arg(long = "binary", value_name = "PATH")]
    binaries: Vec<PathBuf>,
    /// Device nodes to recreate inside (e.g. /dev/kvm), owned by the uid, repeatable.
    #[arg(long = "device", value_name = "PATH")]
    devices: Vec<PathBuf>,
    /// Directories created inside, owned by the uid (sockets, logs), repeatable.
    #[arg(long = "writable-dir", value_name = "PATH")]
    writable_dirs: Vec<PathBuf>,
    /// KEY=VALUE for the program's environment (nothing else is passed), repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The program (a path inside the jail) and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<OsString>,
}

pub fn run(command: JailCommand) -> anyhow::Result<i32> {
    match command {
        JailCommand::Clean { base } => {
            let removed = jail::remove_stale(&base)
                .with_context(|| format!("cleaning jails under {}", base.display()))?;
            for path in removed {
                println!("removed {}", path.display());
            }
            Ok(0)
        }
        JailCommand::Run(args) => {
            let spec = spec_from(*args)?;
            let code = jail::run(&spec).with_context(|| format!("jail {}", spec.root.display()))?;
            Ok(code)
        }
    }
}

/// The shared libraries (and the dynamic loader) `binary` needs, asked of its own loader
/// (`<PT_INTERP> --list`, what `ldd` does) so that no `ldd` script is needed on the host (the
/// host VM has none); none for a static binary.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let Some(loader) = elf_interpreter(binary)? else {
        return Ok(Vec::new());
    };
    let output = std::process::Command::new(&loader)
        .arg("--list")
        .arg(binary)
        .output()
        .with_context(|| format!("cannot run the loader {}", loader.display()))?;
    if !output.status.success() {
        bail!(
            "{} --list {} failed ({}): {}",
            loader.display(),
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut libraries = roost_hostvm::ldd::parse(&String::from_utf8_lossy(&output.stdout))
        .map_err(|message| anyhow::anyhow!(message))?;
    if !libraries.contains(&loader) {
        libraries.push(loader);
    }
    Ok(libraries)
}

/// The `PT_INTERP` path of a 64-bit little-endian ELF executable; `None` when it has none
/// (statically linked).
fn elf_interpreter(binary: &Path) -> anyhow::Result<Option<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let mut file =
        std::fs::File::open(binary).with_context(|| format!("cannot open {}", binary.display()))?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)
        .with_context(|| format!("{} is too short for an ELF header", binary.display()))?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        bail!(
            "{} is not a 64-bit little-endian ELF file",
            binary.display()
        );
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u64_at = |b: &[u8], at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let (phoff, phentsize, phnum) = (
        u64_at(&header, 0x20),
        usize::from(u16_at(&header, 0x36)),
        usize::from(u16_at(&header, 0x38)),
    );
    if phentsize < 56 {
        bail!(
            "{}: unexpected program header size {phentsize}",
            binary.display()
        );
    }
    let mut table = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff))?;
    file.read_exact(&mut table)
        .with_context(|| format!("{}: truncated program headers", binary.display()))?;
    for entry in table.chunks_exact(phentsize) {
        let kind = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
        if kind != PT_INTERP {
            continue;
        }
        let (offset, size) = (u64_at(entry, 8), u64_at(entry, 32));
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s <= 4096)
            .with_context(|| format!("{}: implausible interpreter length", binary.display()))?;
        let mut path = vec![0u8; size];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut path)?;
        let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
        use std::os::unix::ffi::OsStrExt;
        return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(
            &path[..end],
        ))));
    }
    Ok(None)
}

fn spec_from(args: JailRunArgs) -> anyhow::Result<JailSpec> {
    let mut mounts = args
        .mounts
        .iter()
        .map(|m| JailMount::parse(m))
        .collect::<Result<Vec<_>, _>>()?;
    for binary in &args.binaries {
        let binary = binary
            .canonicalize()
            .with_context(|| format!("--binary {}", binary.display()))?;
        let libraries = shared_libraries(&binary)
            .with_context(|| format!("finding the shared libraries of {}", binary.display()))?;
        for path in std::iter::once(binary).chain(libraries) {
            if !mounts.iter().any(|m| m.inside == path) {
                mounts.push(JailMount {
                    host: path.clone(),
                    inside: path,
                    read_only: true,
                });
            }
        }
    }
    let env = args
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((OsString::from(k), OsString::from(v))),
            _ => bail!("--env {kv:?}: use KEY=VALUE"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut command = args.command.into_iter();
    let program = PathBuf::from(command.next().context("no program given after --")?);
    Ok(JailSpec {
        root: args.root,
        uid: args.uid,
        gid: args.gid,
        netns: args.netns,
        tap: args.tap,
        hostname: args.hostname,
        mounts,
        devices: args.devices,
        writable_dirs: args.writable_dirs,
        program,
        args: command.collect(),
        env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_lists_libc_and_its_loader() {
        let sh = Path::new("/bin/sh").canonicalize().unwrap();
        let loader = elf_interpreter(&sh).unwrap().expect("/bin/sh is dynamic");
        let libraries = shared_libraries(&sh).unwrap();
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("libc.so")),
            "{libraries:?}"
        );
        assert!(libraries.contains(&loader), "{libraries:?}");
    }

    #[test]
    fn a_static_binary_needs_nothing_and_other_files_are_refused() {
        // Debian's busybox-static, which the host-VM rig needs anyway.
        assert_eq!(elf_interpreter(Path::new("/bin/busybox")).unwrap(), None);
        assert!(
            shared_libraries(Path::new("/bin/busybox"))
                .unwrap()
                .is_empty()
        );
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        assert!(elf_interpreter(&script).is_err());
    }
}
